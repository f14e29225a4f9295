"""The entry service's logic (``serving.gateway``) around a scripted chat service: the
cache never leaves the process, identical requests share one generation, refusals keep their
status, streams stop the generation when the client leaves, embeddings batch in-process."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from refinery.rag.confidence import Calibration, ConfidenceModel
from refinery.retrieval.search import Hit
from serving.cache import InProcessCache
from serving.gateway import (
    ANSWER_ID_HEADER,
    RAG_MODEL,
    Gateway,
    RagPolicy,
    rag_chat_response,
    rag_chat_stream,
    rag_question,
    unb64,
)
from serving.openai_schema import ApiError, Limits
from serving.traffic import TrafficLog, TrafficSettings


class ScriptedChat:
    def __init__(self, words=("Bees", " make", " honey."), refuse: int | None = None):
        self.words, self.refuse = words, refuse
        self.calls = 0
        self.closed = 0
        self.gate = asyncio.Event()

    async def current_model(self) -> str:
        return "chat/1"

    async def generate(self, item):
        self.calls += 1
        if self.refuse:
            raise ApiError(self.refuse, "refused", code="overloaded")
        try:
            await self.gate.wait()
            for i, word in enumerate(self.words):
                last = i == len(self.words) - 1
                event = {"text": word}
                if last:
                    event.update(finished=True, finish_reason="stop", prompt_tokens=5,
                                 completion_tokens=len(self.words), compute_s=0.5, model="chat/1")  # fmt: skip
                yield event
                await asyncio.sleep(0)
        finally:
            self.closed += 1


def gateway(chat, screen=None, rag_policy: RagPolicy | None = None) -> Gateway:
    return Gateway(
        chat=chat,
        encode=lambda texts: np.eye(len(texts), 4, dtype=np.float32),
        count_tokens=lambda texts: [len(t.split()) for t in texts],
        screen=screen,
        cache=InProcessCache(),
        traffic=TrafficLog(lambda: None, TrafficSettings(sample_rate=0.0)),  # type: ignore[arg-type,return-value]
        limits=Limits(),
        hourly_price=3.6,
        model_id="chat",
        model_label="chat/1",
        embedding_model="mini",
        follow=False,
        rag_policy=rag_policy or RagPolicy(),
    )


ITEM = {"messages": [{"role": "user", "content": "What do bees make?"}], "max_tokens": 8,
        "temperature": 0.0, "top_p": 1.0}  # fmt: skip


def test_identical_requests_share_one_generation_and_repeats_hit_the_cache():
    chat = ScriptedChat()
    gw = gateway(chat)

    async def run():
        tasks = [asyncio.create_task(gw.chat_completion(dict(ITEM), 0.0)) for _ in range(5)]
        await asyncio.sleep(0.01)
        chat.gate.set()
        first = await asyncio.gather(*tasks)
        again = await gw.chat_completion(dict(ITEM), 0.0)
        return first, again

    first, (payload, headers) = asyncio.run(run())
    assert chat.calls == 1  # five callers, one generation, then the cache
    assert {p["choices"][0]["message"]["content"] for p, _ in first} == {"Bees make honey."}
    assert sorted(h["x-refinery-cache"] for _, h in first) == ["miss"] + ["shared"] * 4
    assert headers["x-refinery-cache"] == "hit" and headers["x-refinery-cost-usd"] == "0.00000000"
    assert float(first[0][1]["x-refinery-cost-usd"]) == pytest.approx(0.5 * 3.6 / 3600)
    assert payload["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    gw.close()


def test_sampled_requests_are_neither_cached_nor_shared():
    chat = ScriptedChat()
    chat.gate.set()
    gw = gateway(chat)
    item = {**ITEM, "temperature": 0.7}

    async def run():
        return await asyncio.gather(*(gw.chat_completion(dict(item), 0.0) for _ in range(3)))

    asyncio.run(run())
    assert chat.calls == 3
    gw.close()


def test_a_refusal_keeps_its_status_and_a_blocked_prompt_never_reaches_the_model():
    gw = gateway(ScriptedChat(refuse=503))
    with pytest.raises(ApiError) as err:
        asyncio.run(gw.chat_completion(dict(ITEM), 0.0))
    assert err.value.status == 503
    chat = ScriptedChat()
    guarded = gateway(chat, screen=lambda texts: [{"blocked": True, "reasons": ["override"],
                                                    "message": "Rephrase it."}] * len(texts))  # fmt: skip
    with pytest.raises(ApiError) as blocked:
        asyncio.run(guarded.chat_completion(dict(ITEM), 0.0))
    assert blocked.value.code == "prompt_injection" and "Rephrase it." in blocked.value.message
    assert chat.calls == 0
    gw.close()
    guarded.close()


def test_a_stream_that_the_client_leaves_closes_the_generation():
    chat = ScriptedChat(words=tuple(f" w{i}" for i in range(50)))
    chat.gate.set()
    gw = gateway(chat)

    async def run():
        events = await gw.open_stream(dict(ITEM))
        sse = gw.chat_stream(events, dict(ITEM), {}, 0.0, "a1")
        got = [await anext(sse) for _ in range(3)]
        await sse.aclose()  # what Starlette does when the client disconnects
        return got

    got = asyncio.run(run())
    assert json.loads(got[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(got[1][6:])["choices"][0]["delta"]["content"] == " w0"
    assert chat.closed == 1
    gw.close()


def test_a_complete_stream_ends_with_finish_reason_usage_and_done():
    chat = ScriptedChat()
    chat.gate.set()
    gw = gateway(chat)

    async def run():
        events = await gw.open_stream(dict(ITEM))
        return [
            c async for c in gw.chat_stream(events, dict(ITEM), {"include_usage": True}, 0.0, "a2")
        ]

    chunks = asyncio.run(run())
    assert chunks[-1] == "data: [DONE]\n\n"
    payloads = [json.loads(c[6:]) for c in chunks[:-1]]
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p["choices"])
    assert text == "Bees make honey."
    assert payloads[-2]["choices"][0]["finish_reason"] == "stop"
    assert payloads[-1]["usage"]["completion_tokens"] == 3
    gw.close()


def test_embeddings_are_batched_in_process_and_cached():
    gw = gateway(ScriptedChat())

    async def run():
        many = await asyncio.gather(*(gw.embeddings([f"text {i}"], 0.0) for i in range(6)))
        again = await gw.embeddings(["text 0"], 0.0)
        return many, again

    many, again = asyncio.run(run())
    assert all(state == "miss" for _, _, state, _ in many)
    assert again[2] == "hit" and again[0] == many[0][0]
    assert unb64(many[0][0][0]).shape == (4,)
    assert gw.embedder.items == 6 and gw.embedder.batches < 6  # concurrent texts shared batches
    gw.close()


def test_rag_answers_from_the_hits_caches_and_withholds_below_the_policys_threshold():
    chat = ScriptedChat(words=("Bees", " make", " honey."))
    chat.gate.set()
    hits = [Hit("c1", "d1", "bees.md", "Bees", 0, "Bees make honey from nectar.", 0.8, {}, 1, 1)]
    searched: list[int] = []

    def search(vector, k, filters):
        searched.append(k)
        return hits

    request = {"question": "What do bees make?", "k": 3, "filters": {}, "max_tokens": 8}
    always_unsure = Calibration(
        None, ConfidenceModel(("top_cosine",), (0.5,), (0.1,), (0.0,), 0.0), 0.9
    )
    plain, unsure = (
        gateway(chat, rag_policy=RagPolicy()),
        gateway(chat, rag_policy=RagPolicy(always_unsure)),
    )

    async def run():
        first = await plain.rag(dict(request), search, None, 0.0)
        again = await plain.rag(dict(request), search, None, 0.0)
        withheld, _ = await unsure.rag(dict(request), search, None, 0.0)
        return first, again, withheld

    (answer, headers), (_, again), withheld = asyncio.run(run())
    assert answer["answer"] == "Bees make honey." and answer["sources"][0]["source"] == "bees.md"
    assert not answer["abstained"] and headers["x-refinery-cache"] == "miss"
    assert again["x-refinery-cache"] == "hit" and searched == [3, 3]  # the repeat was cached
    # withheld: the chunk's sentence that holds the question's words, quoted with its source
    assert withheld["abstained"] and withheld["kind"] == "quote"
    assert withheld["answer"] == 'From "Bees" [1]: "Bees make honey from nectar."'
    assert withheld["quote"]["chunk_id"] == "c1" and answer["kind"] == "answer"
    assert withheld["confidence"] == 0.5  # the calibration's sigmoid(0), under its 0.9
    plain.close()
    unsure.close()


def test_refinery_rag_answers_the_last_user_message_with_sources_in_the_body():
    chat = ScriptedChat(words=("Bees", " make", " honey."))
    chat.gate.set()
    gw = gateway(chat)
    hits = [Hit("c1", "d1", "bees.md", "Bees", 0, "Bees make honey from nectar.", 0.8, {}, 1, 1)]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! Ask me about bees."},
        {"role": "user", "content": "  What do bees make? "},
    ]
    question = rag_question(messages)
    assert question == "What do bees make?"
    request = {"question": question, "k": 3, "filters": {}, "max_tokens": 8}

    async def run():
        answer, _ = await gw.rag(request, lambda vector, k, filters: hits, None, 0.0)
        chunks = [c async for c in rag_chat_stream(answer, {"include_usage": True})]
        return answer, chunks

    answer, chunks = asyncio.run(run())
    body = rag_chat_response(answer)
    assert body["model"] == RAG_MODEL == "refinery-rag" and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Bees make honey."}
    assert body["sources"] == [{"source": "bees.md", "title": "Bees", "chunk_id": "c1",
                                "score": 0.8}]  # fmt: skip
    assert body["kind"] == "answer" and 0 <= body["confidence"] <= 1
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    # streamed: the whole answer in one content chunk, the sources on the finish chunk
    assert chunks[-1] == "data: [DONE]\n\n"
    payloads = [json.loads(c[6:]) for c in chunks[:-1]]
    assert [p["choices"][0]["delta"].get("content") for p in payloads[:2]] == [
        "",
        "Bees make honey.",
    ]
    finish = payloads[2]
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["sources"] == body["sources"]
    assert finish["kind"] == "answer" and payloads[3]["usage"]["total_tokens"] == 8
    assert {p["model"] for p in payloads} == {"refinery-rag"}
    gw.close()


def test_refinery_rag_needs_a_user_message_and_other_unknown_models_stay_refused():
    for messages in ([{"role": "system", "content": "Be brief."}],
                     [{"role": "user", "content": "   "}]):  # fmt: skip
        with pytest.raises(ApiError) as err:
            rag_question(messages)
        assert err.value.status == 400 and err.value.code == "no_question"
    with pytest.raises(ApiError) as long:
        rag_question([{"role": "user", "content": "why? " * 1000}])
    assert long.value.status == 400 and long.value.param == "messages"
    gw = gateway(ScriptedChat())
    with pytest.raises(ApiError) as unknown:
        gw.check_model("gpt-4")
    assert unknown.value.status == 404 and unknown.value.code == "model_not_found"
    assert "refinery-rag" in unknown.value.message
    gw.check_model("chat")  # the served model still passes
    gw.close()


# --- the chat service's client: every response closed, whatever the ending --------------------
class _Remote:
    """Shaped like BentoML's streaming client: an outer generator (``_get_stream``) iterating an
    inner one (``_parse_stream_response``) that owns the HTTP response and closes it last."""

    def __init__(self, lines: list[str]) -> None:
        self.lines, self.open = lines, 0
        self.to_async = self

    def generate(self, item):
        async def parse():
            self.open += 1
            try:
                for line in self.lines:
                    yield line
                    await asyncio.sleep(0)
            finally:
                self.open -= 1  # the response goes back to the pool

        async def get_stream():
            resp = parse()
            async for data in resp:
                yield data

        return get_stream()


@pytest.mark.parametrize("leave_after", [None, 1])
def test_the_chat_client_gives_every_connection_back(leave_after):
    import gc

    from serving.service import ChatServiceClient

    events = [json.dumps({"text": "a"}) + "\n", json.dumps({"text": "b", "finished": True}) + "\n"]
    remote = _Remote(events)
    client = ChatServiceClient(remote)

    async def run() -> None:
        for _ in range(3):
            got = []
            gen = client.generate({"messages": []})
            async for event in gen:
                got.append(event)
                if leave_after and len(got) == leave_after:
                    break  # the caller went away mid-answer
            await gen.aclose()
            assert got[-1]["text"] == ("a" if leave_after else "b")

    gc.disable()  # nothing may depend on the collector finding abandoned generators
    try:
        asyncio.run(run())
    finally:
        gc.enable()
    assert remote.open == 0


def test_every_answer_carries_its_own_id_in_the_header_the_body_and_the_traffic_log(
    monkeypatch: pytest.MonkeyPatch,
):
    rows: list[dict] = []
    monkeypatch.setattr(
        TrafficLog, "_write", lambda self, batch: rows.extend(self.finish(r) for r in batch)
    )
    chat = ScriptedChat()
    chat.gate.set()
    gw = gateway(chat)
    gw.context.traffic.settings = TrafficSettings(sample_rate=1.0, flush_s=0.05)
    hits = [Hit("c1", "d1", "bees.md", "Bees", 0, "Bees make honey from nectar.", 0.8, {}, 1, 1)]
    request = {"question": "What do bees make?", "k": 3, "filters": {}, "max_tokens": 8}

    async def run():
        chats = [await gw.chat_completion(dict(ITEM), 0.0) for _ in range(2)]  # miss, then hit
        rags = [await gw.rag(dict(request), lambda v, k, f: hits, None, 0.0) for _ in range(2)]
        events = await gw.open_stream(dict(ITEM))
        streamed = [c async for c in gw.chat_stream(events, dict(ITEM), {}, 0.0, "f" * 32)]
        return chats, rags, streamed

    chats, rags, streamed = asyncio.run(run())
    assert gw.context.traffic.flush(5)
    ids = [h[ANSWER_ID_HEADER] for _, h in chats + rags]
    assert len(set(ids)) == 4 and all(len(i) == 32 for i in ids)  # a cache hit is an answer too
    assert [p["id"] for p, _ in chats] == [f"chatcmpl-{i}" for i in ids[:2]]
    assert json.loads(streamed[0][6:])["id"] == "chatcmpl-" + "f" * 32
    logged = {r["request_id"]: r for r in rows}
    assert set(logged) == {*ids, "f" * 32}
    for answer_id in ids[2:]:  # RAG rows keep the chunks the answer was given
        assert logged[answer_id]["sources"] == [
            {"chunk_id": "c1", "source": "bees.md", "score": 0.8}
        ]
    assert logged[ids[0]]["sources"] == [] and logged[ids[3]]["cache_hit"]
    assert rag_chat_response(rags[0][0], ids[2])["id"] == f"chatcmpl-{ids[2]}"
    gw.close()
