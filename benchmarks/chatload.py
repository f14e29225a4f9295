"""Load generators for OpenAI-compatible chat servers.

``run_chat_load``: N closed-loop clients (each sends its next request when its last one
answered), unique prompts so that no cache can answer (a question from data/sft or data/eval
with a nonce in front), ``max_tokens`` 32, greedy; optional streaming for the time to the first
token. Output tokens are what the server's ``usage`` reports (a streamed answer without usage
counts its content chunks), so an answer that ends early counts what it really produced.
A warm-up round at the same concurrency is sent first and not counted.

``run_wrk``: Debian's compiled ``wrk`` against one repeated POST (the cache-hit load), so the
client does not take the server's cores the way a Python client would.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

REPO_ROOT = Path(__file__).resolve().parent.parent


def chat_prompts() -> list[str]:
    """Questions from the SFT data and the RAG question set, in file order."""
    out: list[str] = []
    for path, key in (
        (REPO_ROOT / "data" / "sft" / "beekeeping_qa.jsonl", "instruction"),
        (REPO_ROOT / "data" / "eval" / "rag_questions.jsonl", "question"),
    ):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(str(json.loads(line)[key]))
    if not out:
        raise ValueError("no questions found in data/sft and data/eval")
    return out


def _pct(values: Sequence[float], q: float) -> float:
    data = sorted(values)
    if not data:
        return math.nan
    k = (len(data) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


@dataclass
class ChatLoadResult:
    clients: int
    stream: bool
    requests: int = 0
    wall_s: float = 0.0
    output_tokens: int = 0
    ok_2xx: int = 0
    client_4xx: int = 0
    server_5xx: int = 0
    other_status: int = 0  # 1xx/3xx: never expected from these routes
    transport_errors: int = 0  # connection refused/reset, timeouts, broken streams
    latencies: list[float] = field(default_factory=list)  # successful requests only
    ttfts: list[float] = field(default_factory=list)  # streaming: time to first content
    errors: list[str] = field(default_factory=list)  # the first few, for the log

    HEADER: ClassVar[list[str]] = [
        "tok/s", "req/s", "tokens/answer", "p50 s", "p99 s", "TTFT p50 ms", "TTFT p99 ms",
        "2xx", "4xx", "5xx", "transport errors",
    ]  # fmt: skip

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.ok_2xx / self.wall_s if self.wall_s else 0.0

    @property
    def p50(self) -> float:
        return _pct(self.latencies, 0.5)

    @property
    def p99(self) -> float:
        return _pct(self.latencies, 0.99)

    @property
    def ttft_p50(self) -> float:
        return _pct(self.ttfts, 0.5)

    @property
    def ttft_p99(self) -> float:
        return _pct(self.ttfts, 0.99)

    def row(self) -> list[str]:
        ttft = [f"{self.ttft_p50 * 1000:.0f}", f"{self.ttft_p99 * 1000:.0f}"]
        return [
            f"{self.tokens_per_s:.1f}",
            f"{self.requests_per_s:.2f}",
            f"{self.output_tokens / max(self.ok_2xx, 1):.1f}",
            f"{self.p50:.2f}",
            f"{self.p99:.2f}",
            *(ttft if self.ttfts else ["–", "–"]),
            str(self.ok_2xx),
            str(self.client_4xx),
            str(self.server_5xx),
            str(self.transport_errors),
        ]

    def summary(self) -> dict[str, Any]:
        return dict(zip(["clients", *self.HEADER], [self.clients, *self.row()], strict=True))


def _body(model: str, prompt: str, max_tokens: int, stream: bool, extra: dict | None) -> dict:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return {**body, **(extra or {})}


async def _one(client: Any, body: dict, result: ChatLoadResult, count: bool) -> None:
    import httpx

    t0 = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    try:
        if body.get("stream"):
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                status = resp.status_code
                chunks = 0
                usage_tokens: int | None = None
                if status == 200:
                    async for line in resp.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        event = json.loads(data)
                        if event.get("usage"):
                            usage_tokens = int(event["usage"].get("completion_tokens") or 0)
                        for choice in event.get("choices") or []:
                            if (choice.get("delta") or {}).get("content"):
                                chunks += 1
                                if ttft is None:
                                    ttft = time.perf_counter() - t0
                else:
                    await resp.aread()
                tokens = usage_tokens if usage_tokens is not None else chunks
        else:
            resp = await client.post("/v1/chat/completions", json=body)
            status = resp.status_code
            if status == 200:
                tokens = int((resp.json().get("usage") or {}).get("completion_tokens") or 0)
    except (httpx.TransportError, json.JSONDecodeError) as err:
        if count:
            result.transport_errors += 1
            if len(result.errors) < 5:
                result.errors.append(f"{type(err).__name__}: {err}")
        return
    if not count:
        return
    if 200 <= status < 300:
        result.ok_2xx += 1
        result.output_tokens += tokens
        result.latencies.append(time.perf_counter() - t0)
        if ttft is not None:
            result.ttfts.append(ttft)
    elif 400 <= status < 500:
        result.client_4xx += 1
    elif status >= 500:
        result.server_5xx += 1
    else:
        result.other_status += 1
    if status >= 300 and len(result.errors) < 5:
        result.errors.append(f"HTTP {status}: {resp.text[:200]}")


async def run_chat_load(
    base_url: str,
    model: str,
    prompts: Sequence[str],
    clients: int,
    requests: int | None = None,
    max_tokens: int = 32,
    stream: bool = False,
    tag: str = "",
    warmup: int | None = None,
    timeout_s: float = 600.0,
    extra: dict | None = None,
    transport: Any = None,
) -> ChatLoadResult:
    """``requests`` (default ``max(4 * clients, 16)``) unique chat requests from ``clients``
    closed-loop clients, after ``warmup`` (default ``clients``) uncounted ones.

    ``extra`` is merged into every request body (e.g. ``{"ignore_eos": True}`` for a server
    that has it); ``transport`` is an httpx transport to use instead of the network (an
    ``httpx.ASGITransport`` measures an ASGI app in-process)."""
    import httpx

    if clients < 1:
        raise ValueError("clients must be >= 1")
    if not prompts:
        raise ValueError("no prompts")
    n = requests if requests is not None else max(4 * clients, 16)
    n_warm = warmup if warmup is not None else clients
    nonce = f"{tag}-{time.time_ns() % 10**9:x}"

    def prompt(i: int) -> str:
        # the nonce goes first so that no prefix beyond the chat template is shared
        return f"[{nonce}-{i}] {prompts[i % len(prompts)]}"

    result = ChatLoadResult(clients=clients, stream=stream)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=timeout_s, limits=limits, transport=transport
    ) as client:

        async def drive(indices: list[int], count: bool) -> None:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in indices:
                queue.put_nowait(i)

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    body = _body(model, prompt(i), max_tokens, stream, extra)
                    await _one(client, body, result, count)

            await asyncio.gather(*(worker() for _ in range(min(clients, len(indices)))))

        if n_warm:
            await drive(list(range(n, n + n_warm)), count=False)
        t0 = time.perf_counter()
        await drive(list(range(n)), count=True)
        result.wall_s = time.perf_counter() - t0
    result.requests = n
    return result


# ---- wrk: the cache-hit load ----

_WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = {body}

done = function(summary, latency, requests)
  io.write(string.format(
    "REFINERY_WRK {{\\"requests\\": %d, \\"duration_us\\": %d, \\"non_2xx\\": %d, "
    .. "\\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, \\"timeout\\": %d, "
    .. "\\"p50_us\\": %d, \\"p90_us\\": %d, \\"p99_us\\": %d, \\"max_us\\": %d}}\\n",
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int  # wrk counts any status >= 400 here (its "Non-2xx or 3xx responses")
    socket_errors: int  # connect + read + write + timeout


def _lua_string(text: str) -> str:
    # a Lua long string cannot hold its own closing bracket: pick a level the text lacks
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


# With ``vary``: every request's body differs (the placeholder in it becomes thread-counter),
# so no cache can answer.
_WRK_VARY_LUA = """
local counter, thread_id = 0, 0
local threads = {{}}
setup = function(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
init = function(args) thread_id = tid or 0 end
request = function()
  counter = counter + 1
  local body = {prefix} .. thread_id .. "-" .. counter .. {suffix}
  return wrk.format("POST", nil, {{["Content-Type"] = "application/json"}}, body)
end
"""


def run_wrk(
    url: str,
    body: dict[str, Any],
    connections: int = 32,
    threads: int = 2,
    duration_s: float = 10.0,
    timeout_s: float = 5.0,
    wrk: str | None = None,
    vary: str | None = None,
) -> WrkResult:
    """POST ``body`` (JSON) to ``url`` as fast as ``connections`` connections allow for
    ``duration_s``; requests/s and latency percentiles as wrk measured them. ``vary``: a
    placeholder in the body that each request replaces with its own number (unique bodies)."""
    exe = wrk or shutil.which("wrk")
    if exe is None:
        raise FileNotFoundError("wrk is not installed (scripts/system-deps.sh --bench installs it)")
    if connections < threads:
        raise ValueError("wrk needs at least one connection per thread")
    with tempfile.TemporaryDirectory(prefix="refinery-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        text = json.dumps(body)
        lua = _WRK_LUA.format(body=_lua_string(text))
        if vary is not None:
            if vary not in text:
                raise ValueError(f"the placeholder {vary!r} is not in the body")
            prefix, suffix = text.split(vary, 1)
            lua += _WRK_VARY_LUA.format(prefix=_lua_string(prefix), suffix=_lua_string(suffix))
        script.write_text(lua)
        proc = subprocess.run(
            [exe, "-t", str(threads), "-c", str(connections), "-d", f"{duration_s:g}s",
             "--timeout", f"{timeout_s:g}s", "-s", str(script), url],
            capture_output=True, text=True, timeout=duration_s + 60,
        )  # fmt: skip
    match = re.search(r"^REFINERY_WRK (\{.*\})$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    d = json.loads(match.group(1))
    seconds = d["duration_us"] / 1e6
    return WrkResult(
        requests=d["requests"],
        duration_s=seconds,
        requests_per_s=d["requests"] / seconds if seconds else 0.0,
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        max_ms=d["max_us"] / 1000,
        non_2xx=d["non_2xx"],
        socket_errors=d["connect"] + d["read"] + d["write"] + d["timeout"],
    )
