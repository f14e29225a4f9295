"""The chat load generator's accounting, against an in-process stand-in for a server (the
generator is the code under test; the peers it runs against are exercised by
`python -m benchmarks.peers`)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from benchmarks.chatload import ChatLoadResult, _lua_string, chat_prompts, run_chat_load


def _server(seen: list[dict]):
    """Answers by the question: 'bad' -> 400, 'boom' -> 500, 'drop' -> connection error,
    otherwise 200 with usage (7 tokens), or an SSE stream of 3 chunks plus usage."""

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        text = body["messages"][0]["content"]
        if "bad" in text:
            return httpx.Response(400, json={"error": "bad"})
        if "boom" in text:
            return httpx.Response(500, json={"error": "boom"})
        if "drop" in text:
            raise httpx.ConnectError("dropped", request=request)
        if body.get("stream"):
            events = [{"choices": [{"delta": {"content": w}}]} for w in ("a", "b", "c")]
            events.append({"choices": [], "usage": {"completion_tokens": 3}})
            sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return httpx.Response(
                200, content=sse.encode(), headers={"content-type": "text/event-stream"}
            )
        return httpx.Response(200, json={"choices": [], "usage": {"completion_tokens": 7}})

    return httpx.MockTransport(handler)


def test_counts_statuses_tokens_and_errors_separately() -> None:
    seen: list[dict] = []
    prompts = ["fine", "bad", "boom", "drop"]
    r = asyncio.run(
        run_chat_load("http://test", "m", prompts, clients=2, requests=8, warmup=4,
                      transport=_server(seen))
    )  # fmt: skip
    assert (r.ok_2xx, r.client_4xx, r.server_5xx, r.transport_errors) == (2, 2, 2, 2)
    assert r.output_tokens == 14
    assert len(r.latencies) == 2 and not r.ttfts
    assert len(seen) == 4 + 8  # the uncounted warm-up requests were sent too
    texts = [b["messages"][0]["content"] for b in seen]
    assert len(set(texts)) == len(texts)  # every prompt unique: no cache can answer
    assert all(b["max_tokens"] == 32 and b["temperature"] == 0.0 for b in seen)


def test_streaming_measures_time_to_first_token_and_uses_usage() -> None:
    r = asyncio.run(
        run_chat_load("http://test", "m", ["fine"], clients=3, requests=6, stream=True,
                      transport=_server([]))
    )  # fmt: skip
    assert r.ok_2xx == 6 and r.output_tokens == 18
    assert len(r.ttfts) == 6 and all(
        0 <= t <= lat for t, lat in zip(r.ttfts, r.latencies, strict=True)
    )
    row = dict(zip(ChatLoadResult.HEADER, r.row(), strict=True))
    assert row["tokens/answer"] == "3.0" and row["TTFT p50 ms"] != "–"


def test_bad_arguments_and_prompt_source() -> None:
    with pytest.raises(ValueError):
        asyncio.run(run_chat_load("http://test", "m", ["x"], clients=0))
    with pytest.raises(ValueError):
        asyncio.run(run_chat_load("http://test", "m", [], clients=1))
    assert len(chat_prompts()) >= 300


def test_lua_long_string_survives_its_own_brackets() -> None:
    text = "a]]b]=]c"
    quoted = _lua_string(text)
    assert quoted.startswith("[==[") and quoted.endswith("]==]") and text in quoted
