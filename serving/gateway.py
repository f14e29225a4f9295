"""What the entry service does, as plain code (the BentoML class in ``service.py`` only wires
routes to it): cache and single flight, the guard, embeddings in this process, RAG retrieval,
generation through the chat service's engine, cost accounting, the traffic log.

A cache hit never leaves this process. Identical requests in flight share one generation.
Embeddings (and the guard's screening, which embeds too) run here, on a micro-batcher over the
in-process model: no hop to another service and no copy of the vectors on the way.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from serving.accounting import request_cost
from serving.cache import ResponseCache, cache_key
from serving.concurrency import MicroBatcher, SingleFlight
from serving.metrics import (
    ANSWER_LEAKS,
    CACHE,
    COST,
    GUARD_BLOCKS,
    MODEL_INFO,
    REQUEST_COST,
    SCREENED_CHUNKS,
    SHARED,
    TOKENS,
)
from serving.openai_schema import ApiError, Limits, chat_chunk, chat_response
from serving.traffic import TrafficLog

RETRY_AFTER_S = "1"
RAG_DEFAULT_TOKENS = 96  # (capped at the service's max_tokens)


def timed_out(what: str, seconds: float) -> ApiError:
    return ApiError(
        504,
        f"{what} took longer than {seconds:.0f} s; retry, or ask for fewer tokens",
        type="server_error",
        code="timeout",
        headers={"Retry-After": RETRY_AFTER_S},
    )


class ChatClient(Protocol):
    """The chat service as the gateway sees it: a stream of events per request."""

    def generate(self, item: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...
    async def current_model(self) -> str: ...


@dataclass(frozen=True)
class Embedded:
    vector: np.ndarray  # (dim,) float32, unit length
    tokens: int
    compute_s: float


def b64(vector: np.ndarray) -> str:
    """A vector as OpenAI's base64 encoding: little-endian float32 bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def unb64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")  # (dim,)


class Gateway:
    def __init__(
        self,
        *,
        chat: ChatClient,
        encode: Callable[[list[str]], np.ndarray],
        count_tokens: Callable[[list[str]], list[int]],
        screen: Callable[[list[str]], list[dict[str, Any]]] | None,
        chunk_screen: Any = None,
        cache: ResponseCache,
        traffic: TrafficLog,
        limits: Limits,
        hourly_price: float,
        model_id: str,
        model_label: str,
        embedding_model: str,
        follow: bool,
        embed_batch: int = 32,
        timeout_s: float = 120.0,
        variant: str = "none",
    ) -> None:
        self.chat, self.cache, self.traffic, self.limits = chat, cache, traffic, limits
        self.hourly_price, self.model_id, self.variant = hourly_price, model_id, variant
        self.model_label = ""
        self.show_model(model_label)
        self.embedding_model, self.follow = embedding_model, follow
        self.screen_fn, self.chunk_screen = screen, chunk_screen
        # Every request ends within this: a generation, an embedding, a retrieval that takes
        # longer answers 504 (the engine request is cancelled), never a hang.
        self.timeout_s = timeout_s
        self.flight = SingleFlight()
        self._label_checked = 0.0

        def embed_batch_fn(texts: Sequence[str]) -> list[Embedded]:
            t0 = time.perf_counter()
            vectors = encode(list(texts))  # (n, dim)
            share = (time.perf_counter() - t0) / max(1, len(texts))
            tokens = count_tokens(list(texts))
            return [Embedded(v, n, share) for v, n in zip(vectors, tokens, strict=True)]

        self.embedder = MicroBatcher(embed_batch_fn, max_batch=embed_batch, name="embed-batcher")

    # -- helpers ------------------------------------------------------------------------------
    def account(self, endpoint: str, prompt: int, completion: int, compute_s: float) -> float:
        cost = request_cost(compute_s, self.hourly_price)
        TOKENS.labels(endpoint=endpoint, direction="in").inc(prompt)
        if completion:
            TOKENS.labels(endpoint=endpoint, direction="out").inc(completion)
        COST.labels(endpoint=endpoint).inc(cost)
        REQUEST_COST.labels(endpoint=endpoint).observe(cost)
        return cost

    async def refresh_label(self) -> None:
        """When the chat service follows an alias, learn (every 2 s) which version answers, so
        that cache keys and headers name the model that will answer."""
        now = time.monotonic()
        if self.follow and now - self._label_checked > 2.0:
            self._label_checked = now
            self.show_model(await self.chat.current_model())

    def show_model(self, label: str) -> None:
        """Move the answering version (and its ``refinery_model_info`` series) to ``label``."""
        if label == self.model_label:
            return
        if self.model_label:
            MODEL_INFO.labels(model=self.model_label, variant=self.variant).set(0)
        self.model_label = label
        MODEL_INFO.labels(model=label, variant=self.variant).set(1)

    def log(self, endpoint: str, prompt: str, t0: float, **fields: Any) -> None:
        """One traffic-log row (sampled, queued; written by a background thread)."""
        fields.setdefault("guard", "passed" if self.screen_fn else "off")
        self.traffic.record(
            endpoint=endpoint,
            model=fields.pop("model", self.model_label),
            prompt=prompt,
            latency_s=time.perf_counter() - t0,
            **fields,
        )

    async def _cache_io(self, method: Callable[..., Any], *args: Any) -> Any:
        if self.cache.backend == "memory":  # a dict lookup: no thread hop
            return method(*args)
        return await asyncio.to_thread(method, *args)  # Redis: network I/O off the loop

    async def cached(self, endpoint: str, key: str | None) -> Any:
        if key is None:
            return None
        outcome, value = await self._cache_io(self.cache.get, key)
        CACHE.labels(endpoint=endpoint, result=outcome).inc()
        return value

    async def remember(self, key: str | None, value: Any) -> None:
        if key is not None:
            await self._cache_io(self.cache.set, key, value)

    async def screen(self, endpoint: str, texts: list[str], t0: float) -> None:
        if self.screen_fn is None or not texts:
            return
        verdicts = await asyncio.to_thread(self.screen_fn, texts)
        for v in verdicts:
            if v["blocked"]:
                for reason in v["reasons"]:
                    GUARD_BLOCKS.labels(endpoint=endpoint, reason=reason).inc()
                self.log(endpoint, "\n".join(texts), t0, answer=None, status=400, guard="blocked")
                message = v.get("message") or (
                    "the request looks like a prompt injection and was blocked "
                    f"({', '.join(v['reasons'])})"
                )
                raise ApiError(400, message, code="prompt_injection")

    def check_model(self, model: str | None) -> None:
        if model and model not in (self.model_id, self.model_label, "refinery", "default"):
            raise ApiError(
                404,
                f"model {model!r} is not served here; GET /v1/models lists {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def headers(self, cache: str, cost: float, label: str | None = None) -> dict[str, str]:
        return {
            "x-refinery-model-version": label or self.model_label,
            "x-refinery-cache": cache,
            "x-refinery-cost-usd": f"{cost:.8f}",
        }

    async def generate(self, item: dict[str, Any]) -> dict[str, Any]:
        """The whole answer of one generation request (events of the chat service folded)."""
        text: list[str] = []
        last: dict[str, Any] = {}
        try:
            async with asyncio.timeout(self.timeout_s):
                if hasattr(self.chat, "complete"):  # one plain call, no stream to read
                    last = await self.chat.complete(item)
                    text.append(last.get("text", ""))
                else:
                    async for event in self.chat.generate(item):
                        text.append(event.get("text", ""))
                        last = event
        except TimeoutError:
            raise timed_out("the answer", self.timeout_s) from None
        if last.get("finish_reason") == "error":
            raise ApiError(
                503, f"generation failed: {last.get('error')}", type="server_error",
                code="generation_failed", headers={"Retry-After": RETRY_AFTER_S},
            )  # fmt: skip
        return {**last, "text": "".join(text).strip()}

    # -- chat --------------------------------------------------------------------------------
    async def chat_completion(
        self, item: dict[str, Any], t0: float
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Non-streamed chat: the cache, then one shared generation per identical request."""
        user_turns = [m["content"] for m in item["messages"] if m["role"] == "user"]
        prompt = user_turns[-1] if user_turns else ""
        greedy = item["temperature"] == 0 and item.get("seed") is None
        key = cache_key("chat", self.model_label, item) if greedy else None
        hit = await self.cached("chat", key)
        if hit is not None:  # cached answers passed the guard when they were made
            self.log("chat", prompt, t0, answer=hit["text"], cache_hit=True, guard="cached")
            return chat_response(self.model_id, **hit), self.headers("hit", 0.0)
        await self.screen("chat", user_turns, t0)

        async def make() -> dict[str, Any]:
            out = await self.generate(item)
            result = {
                "text": out["text"],
                "finish": out["finish_reason"],
                "prompt_tokens": out["prompt_tokens"],
                "completion_tokens": out["completion_tokens"],
            }
            await self.remember(key, result)
            return {"result": result, "model": out.get("model", self.model_label),
                    "compute_s": out.get("compute_s", 0.0)}  # fmt: skip

        done, shared = await self.flight.run(key, make)
        result, label = done["result"], done["model"]
        self.show_model(label)
        cost = 0.0
        if shared:
            SHARED.labels(endpoint="chat").inc()
        else:
            cost = self.account(
                "chat", result["prompt_tokens"], result["completion_tokens"], done["compute_s"]
            )
        self.log(
            "chat", prompt, t0, answer=result["text"], prompt_tokens=result["prompt_tokens"],
            completion_tokens=result["completion_tokens"], cost_usd=cost, model=label,
        )  # fmt: skip
        state = "shared" if shared else "miss"
        return chat_response(self.model_id, **result), self.headers(state, cost, label)

    async def open_stream(self, item: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """The events of one generation, its first one already there: a request the engine
        refuses (busy, prompt too long) raises here, while its HTTP status can still say so."""
        events: Any = self.chat.generate(item)
        try:
            first = await asyncio.wait_for(anext(events), self.timeout_s)
        except TimeoutError:
            await events.aclose()
            raise timed_out("the first token", self.timeout_s) from None

        async def all_events() -> AsyncGenerator[dict[str, Any], None]:
            try:
                yield first
                async for event in events:
                    yield event
            finally:
                await events.aclose()  # the client went away: the engine request is cancelled

        return all_events()

    async def chat_stream(
        self,
        events: AsyncIterator[dict[str, Any]],
        item: dict[str, Any],
        options: dict[str, Any],
        t_start: float,
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, straight from the engine's batches; a
        client that goes away closes this generator, which cancels its engine request."""
        chunk_id = f"chatcmpl-{uuid.uuid4().hex}"

        def sse(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        yield sse(chat_chunk(chunk_id, self.model_id, {"role": "assistant", "content": ""}))
        pieces: list[str] = []
        last: dict[str, Any] = {}
        try:
            async for event in events:
                last = event
                if event.get("text"):
                    pieces.append(event["text"])
                    yield sse(chat_chunk(chunk_id, self.model_id, {"content": event["text"]}))
            if last.get("finish_reason") == "error":
                raise ApiError(503, f"generation failed: {last.get('error')}", type="server_error")
        except ApiError as err:
            # Headers are gone once a stream has started: report the error in-band, as an SSE
            # event with OpenAI's error body, and end the stream.
            yield sse(err.body())
            return
        prompt_tokens, completion_tokens = (
            last.get("prompt_tokens", 0),
            last.get("completion_tokens", 0),
        )
        cost = self.account("chat", prompt_tokens, completion_tokens, last.get("compute_s", 0.0))
        turns = [m["content"] for m in item["messages"] if m["role"] == "user"]
        self.log(
            "chat", turns[-1] if turns else "", t_start, answer="".join(pieces),
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost_usd=cost,
            model=last.get("model", self.model_label),
        )  # fmt: skip
        yield sse(chat_chunk(chunk_id, self.model_id, {}, last.get("finish_reason") or "stop"))
        if options.get("include_usage"):
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            payload = chat_chunk(chunk_id, self.model_id, {}, None, usage)
            payload["choices"] = []
            yield sse(payload)
        yield "data: [DONE]\n\n"

    # -- embeddings --------------------------------------------------------------------------
    async def embed(self, texts: list[str]) -> list[Embedded]:
        try:
            return await asyncio.wait_for(self.embedder.submit_many(texts), self.timeout_s)
        except TimeoutError:
            raise timed_out("the embedding", self.timeout_s) from None

    async def embeddings(self, texts: list[str], t0: float) -> tuple[list[str], int, str, float]:
        """(base64 vectors, tokens, cache state, cost)."""
        key = cache_key("embeddings", self.embedding_model, {"input": texts})
        hit = await self.cached("embeddings", key)
        cost, state = 0.0, "hit"
        if hit is None:
            rows = await self.embed(texts)
            hit = {"vectors": [b64(r.vector) for r in rows], "tokens": sum(r.tokens for r in rows)}
            cost = self.account("embeddings", hit["tokens"], 0, sum(r.compute_s for r in rows))
            await self.remember(key, hit)
            state = "miss"
        self.log(
            "embeddings", "\n".join(texts), t0, answer=None, prompt_tokens=hit["tokens"],
            cost_usd=cost, cache_hit=state == "hit", guard="off",  # embeddings are not screened
        )  # fmt: skip
        return hit["vectors"], hit["tokens"], state, cost

    def close(self) -> None:
        self.embedder.close()
        self.traffic.close()

    # -- RAG ---------------------------------------------------------------------------------
    async def rag(
        self,
        request: dict[str, Any],
        search: Callable[[np.ndarray, int, Any], list[Any]],
        filters: Any,
        t0: float,
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Answer ``request["question"]`` from the corpus: retrieval (``search``: vector, k,
        filters → hits), a prompt with the chunks, one shared generation per identical request."""
        from refinery.rag.answer import make_answer, new_canary, prepare

        question = request["question"]
        key = cache_key("rag", self.model_label, request)
        hit = await self.cached("rag", key)
        if hit is not None:  # cached answers passed the guard when they were made
            self.log(
                "rag", question, t0, answer=hit["answer"], cache_hit=True, guard="cached",
                retrieval_scores=[s["score"] for s in hit["sources"]],
            )  # fmt: skip
            return hit, self.headers("hit", 0.0)
        await self.screen("rag", [question], t0)

        async def make() -> dict[str, Any]:
            (emb,) = await self.embed([question])
            try:
                hits = await asyncio.wait_for(
                    asyncio.to_thread(search, emb.vector, request["k"], filters), self.timeout_s
                )
            except TimeoutError:
                raise timed_out("retrieval", self.timeout_s) from None
            # Chunks that try to instruct the model are dropped (indirect injection); a random
            # canary in the system prompt tells when an answer repeats it.
            prompt = await asyncio.to_thread(
                prepare, question, hits, screen=self.chunk_screen, canary=new_canary()
            )
            if prompt.screened:
                SCREENED_CHUNKS.labels(endpoint="rag").inc(prompt.screened)
            item = {
                "messages": prompt.messages,
                "max_tokens": request["max_tokens"],
                "temperature": 0.0,
                "top_p": 1.0,
            }
            out = await self.generate(item)
            answer = make_answer(
                question, prompt.hits, out["text"], out["prompt_tokens"], out["completion_tokens"],
                screened=prompt.screened, canary=prompt.canary,
            ).to_dict()  # fmt: skip
            if answer["leak"]:
                ANSWER_LEAKS.labels(endpoint="rag", how=answer["leak"]).inc()
            answer["model"] = out.get("model", self.model_label)
            await self.remember(key, answer)
            compute = out.get("compute_s", 0.0) + emb.compute_s
            return {"answer": answer, "compute_s": compute, "embed_tokens": emb.tokens,
                    "scores": [h.score for h in hits]}  # fmt: skip

        done, shared = await self.flight.run(key, make)
        answer = done["answer"]
        self.show_model(answer["model"])
        prompt_tokens = answer["prompt_tokens"] + done["embed_tokens"]
        cost = 0.0
        if shared:
            SHARED.labels(endpoint="rag").inc()
        else:
            cost = self.account(
                "rag", prompt_tokens, answer["completion_tokens"], done["compute_s"]
            )
        self.log(
            "rag", question, t0, answer=answer["answer"], prompt_tokens=prompt_tokens,
            completion_tokens=answer["completion_tokens"], cost_usd=cost,
            retrieval_scores=done["scores"], model=answer["model"],
        )  # fmt: skip
        return answer, self.headers("shared" if shared else "miss", cost, answer["model"])
