"""What the entry service does, as plain code (the BentoML class in ``service.py`` only wires
routes to it): cache and single flight, the guard, embeddings in this process, RAG retrieval,
generation through the chat service's engine, cost accounting, the traffic log.

One handler per endpoint family (``ChatHandler``, ``EmbeddingsHandler``, ``RagHandler``), over
one ``GatewayContext`` holding what they share: the chat service, the cache, the traffic log,
limits, pricing, which model answers, the guard's screen and the timeout. ``Gateway`` builds
them from one set of arguments and is what the service holds.

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

from refinery.rag.answer import make_answer
from refinery.rag.confidence import Calibration
from refinery.rag.prompt import new_canary, prepare
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
from serving.traces import ServedAnswer, ServedTraces
from serving.traffic import TrafficLog, new_answer_id

RETRY_AFTER_S = "1"
RAG_DEFAULT_TOKENS = 96  # (capped at the service's max_tokens)
RAG_DEFAULT_K = 3  # chunks retrieved when a request does not say
RAG_MAX_QUESTION_CHARS = 4000
# The model id that answers chat completions through retrieval (``rag_chat_response``).
RAG_MODEL = "refinery-rag"
# The shape of a cached /rag answer: bumped when its fields change, so that a cache filled by
# an older service (Redis outlives a deployment) never answers with the old shape.
RAG_ANSWER_SHAPE = 2


# The id of a served answer: its traffic-log request_id, what `refinery explain` takes.
ANSWER_ID_HEADER = "x-refinery-answer-id"


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


# -- the shared parts -----------------------------------------------------------------------------
class ModelIdentity:
    """Which model answers: the registered name clients ask for (``model_id``), the version
    answering now (``label``; it moves when the chat service follows an alias) and its
    variant. The one mutable part of the context."""

    def __init__(self, model_id: str, label: str, variant: str, follow: bool) -> None:
        self.model_id, self.variant, self.follow = model_id, variant, follow
        self.label = ""
        self._checked = 0.0
        self.show(label)

    def show(self, label: str) -> None:
        """Move the answering version (and its ``refinery_model_info`` series) to ``label``."""
        if label == self.label:
            return
        if self.label:
            MODEL_INFO.labels(model=self.label, variant=self.variant).set(0)
        self.label = label
        MODEL_INFO.labels(model=label, variant=self.variant).set(1)

    async def refresh(self, chat: ChatClient) -> None:
        """When the chat service follows an alias, learn (every 2 s) which version answers, so
        that cache keys and headers name the model that will answer."""
        now = time.monotonic()
        if self.follow and now - self._checked > 2.0:
            self._checked = now
            self.show(await chat.current_model())

    def check(self, model: str | None) -> None:
        """Refuse a request for a model that is not served here."""
        if model and model not in (self.model_id, self.label, "refinery", "default"):
            raise ApiError(
                404,
                f"model {model!r} is not served here; GET /v1/models lists {self.model_id!r} "
                f"(and {RAG_MODEL!r}, which answers from the documents)",
                param="model",
                code="model_not_found",
            )


@dataclass(frozen=True)
class GatewayContext:
    """What every handler shares: the chat service, the response cache, the traffic log, the
    request limits, the price of an hour of this replica, which model answers, the guard's
    screen (None: off) and the time every request ends within (a generation, an embedding, a
    retrieval that takes longer answers 504, never a hang)."""

    chat: ChatClient
    cache: ResponseCache
    traffic: TrafficLog
    limits: Limits
    hourly_price: float
    model: ModelIdentity
    screen_fn: Callable[[list[str]], list[dict[str, Any]]] | None = None
    timeout_s: float = 120.0
    traces: ServedTraces | None = None  # served answers as MLflow traces (None: off)

    def trace(self, answer: ServedAnswer) -> None:
        """Queue a generated answer for MLflow (sampled; written by a background thread)."""
        if self.traces is not None:
            self.traces.record(answer)

    def account(self, endpoint: str, prompt: int, completion: int, compute_s: float) -> float:
        cost = request_cost(compute_s, self.hourly_price)
        TOKENS.labels(endpoint=endpoint, direction="in").inc(prompt)
        if completion:
            TOKENS.labels(endpoint=endpoint, direction="out").inc(completion)
        COST.labels(endpoint=endpoint).inc(cost)
        REQUEST_COST.labels(endpoint=endpoint).observe(cost)
        return cost

    def log(self, endpoint: str, prompt: str, t0: float, **fields: Any) -> None:
        """One traffic-log row (sampled, queued; written by a background thread)."""
        fields.setdefault("guard", "passed" if self.screen_fn else "off")
        self.traffic.record(
            endpoint=endpoint,
            model=fields.pop("model", self.model.label),
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
        """Refuse (400) texts the guard blocks, saying why; nothing when the guard is off."""
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

    def headers(
        self, cache: str, cost: float, label: str | None = None, answer_id: str | None = None
    ) -> dict[str, str]:
        out = {
            "x-refinery-model-version": label or self.model.label,
            "x-refinery-cache": cache,
            "x-refinery-cost-usd": f"{cost:.8f}",
        }
        if answer_id:
            out[ANSWER_ID_HEADER] = answer_id
        return out

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


# -- chat -----------------------------------------------------------------------------------------
class ChatHandler:
    """``/v1/chat/completions``: cached and shared when greedy, or streamed from the engine."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.flight = SingleFlight()

    async def completion(
        self, item: dict[str, Any], t0: float
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Non-streamed chat: the cache, then one shared generation per identical request."""
        ctx, answer_id = self.ctx, new_answer_id()
        user_turns = [m["content"] for m in item["messages"] if m["role"] == "user"]
        prompt = user_turns[-1] if user_turns else ""
        greedy = item["temperature"] == 0 and item.get("seed") is None
        key = cache_key("chat", ctx.model.label, item) if greedy else None
        hit = await ctx.cached("chat", key)
        if hit is not None:  # cached answers passed the guard when they were made
            ctx.log(
                "chat", prompt, t0, answer=hit["text"], cache_hit=True, guard="cached",
                answer_id=answer_id,
            )  # fmt: skip
            return chat_response(ctx.model.model_id, **hit, answer_id=answer_id), ctx.headers(
                "hit", 0.0, answer_id=answer_id
            )
        await ctx.screen("chat", user_turns, t0)
        done, shared = await self.flight.run(key, lambda: self._make(item, key))
        result, label = done["result"], done["model"]
        ctx.model.show(label)
        cost = 0.0
        if shared:
            SHARED.labels(endpoint="chat").inc()
        else:
            cost = ctx.account(
                "chat", result["prompt_tokens"], result["completion_tokens"], done["compute_s"]
            )
            ctx.trace(
                ServedAnswer(
                    "chat", answer_id, label, prompt, item["messages"], result["text"],
                    done["started_ns"], done["generate_ns"], time.time_ns(),
                    result["prompt_tokens"], result["completion_tokens"],
                )
            )  # fmt: skip
        ctx.log(
            "chat", prompt, t0, answer=result["text"], prompt_tokens=result["prompt_tokens"],
            completion_tokens=result["completion_tokens"], cost_usd=cost, model=label,
            answer_id=answer_id,
        )  # fmt: skip
        state = "shared" if shared else "miss"
        return chat_response(ctx.model.model_id, **result, answer_id=answer_id), ctx.headers(
            state, cost, label, answer_id
        )

    async def _make(self, item: dict[str, Any], key: str | None) -> dict[str, Any]:
        """One generation, cached under ``key``; what every caller sharing it receives."""
        started = time.time_ns()
        out = await self.ctx.generate(item)
        generated = (started, time.time_ns())
        result = {
            "text": out["text"],
            "finish": out["finish_reason"],
            "prompt_tokens": out["prompt_tokens"],
            "completion_tokens": out["completion_tokens"],
        }
        await self.ctx.remember(key, result)
        return {"result": result, "model": out.get("model", self.ctx.model.label),
                "compute_s": out.get("compute_s", 0.0), "started_ns": started,
                "generate_ns": generated}  # fmt: skip

    async def open_stream(self, item: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """The events of one generation, its first one already there: a request the engine
        refuses (busy, prompt too long) raises here, while its HTTP status can still say so."""
        timeout_s = self.ctx.timeout_s
        events: Any = self.ctx.chat.generate(item)
        try:
            first = await asyncio.wait_for(anext(events), timeout_s)
        except TimeoutError:
            await events.aclose()
            raise timed_out("the first token", timeout_s) from None

        async def all_events() -> AsyncGenerator[dict[str, Any], None]:
            try:
                yield first
                async for event in events:
                    yield event
            finally:
                await events.aclose()  # the client went away: the engine request is cancelled

        return all_events()

    async def stream(
        self,
        events: AsyncIterator[dict[str, Any]],
        item: dict[str, Any],
        options: dict[str, Any],
        t_start: float,
        answer_id: str,
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, straight from the engine's batches; a
        client that goes away closes this generator, which cancels its engine request."""
        chunk_id, model_id = f"chatcmpl-{answer_id}", self.ctx.model.model_id
        yield _sse(chat_chunk(chunk_id, model_id, {"role": "assistant", "content": ""}))
        pieces: list[str] = []
        last: dict[str, Any] = {}
        try:
            async for event in events:
                last = event
                if event.get("text"):
                    pieces.append(event["text"])
                    yield _sse(chat_chunk(chunk_id, model_id, {"content": event["text"]}))
            if last.get("finish_reason") == "error":
                raise ApiError(503, f"generation failed: {last.get('error')}", type="server_error")
        except ApiError as err:
            # Headers are gone once a stream has started: report the error in-band, as an SSE
            # event with OpenAI's error body, and end the stream.
            yield _sse(err.body())
            return
        prompt_tokens, completion_tokens = self._account_stream(
            item, last, pieces, t_start, answer_id
        )
        yield _sse(chat_chunk(chunk_id, model_id, {}, last.get("finish_reason") or "stop"))
        if options.get("include_usage"):
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            payload = chat_chunk(chunk_id, model_id, {}, None, usage)
            payload["choices"] = []
            yield _sse(payload)
        yield "data: [DONE]\n\n"

    def _account_stream(
        self,
        item: dict[str, Any],
        last: dict[str, Any],
        pieces: list[str],
        t_start: float,
        answer_id: str,
    ) -> tuple[int, int]:
        """Cost and traffic-log row of a finished stream; (prompt, completion) tokens."""
        ctx = self.ctx
        prompt_tokens, completion_tokens = (
            last.get("prompt_tokens", 0),
            last.get("completion_tokens", 0),
        )
        cost = ctx.account("chat", prompt_tokens, completion_tokens, last.get("compute_s", 0.0))
        turns = [m["content"] for m in item["messages"] if m["role"] == "user"]
        now = time.time_ns()
        started = now - int((time.perf_counter() - t_start) * 1e9)
        ctx.trace(
            ServedAnswer(
                "chat", answer_id, last.get("model", ctx.model.label), turns[-1] if turns else "",
                item["messages"], "".join(pieces), started, (started, now), now, prompt_tokens,
                completion_tokens,
            )
        )  # fmt: skip
        ctx.log(
            "chat", turns[-1] if turns else "", t_start, answer="".join(pieces),
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost_usd=cost,
            model=last.get("model", ctx.model.label), answer_id=answer_id,
        )  # fmt: skip
        return prompt_tokens, completion_tokens


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


# -- embeddings -----------------------------------------------------------------------------------
class EmbeddingsHandler:
    """``/v1/embeddings`` and the questions RAG embeds: a micro-batcher over the in-process
    model, answers cached by text."""

    def __init__(
        self,
        ctx: GatewayContext,
        *,
        encode: Callable[[list[str]], np.ndarray],
        count_tokens: Callable[[list[str]], list[int]],
        model_name: str,
        max_batch: int = 32,
    ) -> None:
        self.ctx, self.model_name = ctx, model_name

        def embed_batch(texts: Sequence[str]) -> list[Embedded]:
            t0 = time.perf_counter()
            vectors = encode(list(texts))  # (n, dim)
            share = (time.perf_counter() - t0) / max(1, len(texts))
            tokens = count_tokens(list(texts))
            return [Embedded(v, n, share) for v, n in zip(vectors, tokens, strict=True)]

        self.batcher = MicroBatcher(embed_batch, max_batch=max_batch, name="embed-batcher")

    async def embed(self, texts: list[str]) -> list[Embedded]:
        try:
            return await asyncio.wait_for(self.batcher.submit_many(texts), self.ctx.timeout_s)
        except TimeoutError:
            raise timed_out("the embedding", self.ctx.timeout_s) from None

    async def embeddings(self, texts: list[str], t0: float) -> tuple[list[str], int, str, float]:
        """(base64 vectors, tokens, cache state, cost)."""
        ctx = self.ctx
        key = cache_key("embeddings", self.model_name, {"input": texts})
        hit = await ctx.cached("embeddings", key)
        cost, state = 0.0, "hit"
        if hit is None:
            rows = await self.embed(texts)
            hit = {"vectors": [b64(r.vector) for r in rows], "tokens": sum(r.tokens for r in rows)}
            cost = ctx.account("embeddings", hit["tokens"], 0, sum(r.compute_s for r in rows))
            await ctx.remember(key, hit)
            state = "miss"
        ctx.log(
            "embeddings", "\n".join(texts), t0, answer=None, prompt_tokens=hit["tokens"],
            cost_usd=cost, cache_hit=state == "hit", guard="off",  # embeddings are not screened
        )  # fmt: skip
        return hit["vectors"], hit["tokens"], state, cost

    def close(self) -> None:
        self.batcher.close()


# -- RAG ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RagPolicy:
    """How ``/rag`` scores and withholds answers: the fitted confidence model (None: the
    lexical score, nothing withheld; ``refinery.rag.confidence.load_calibration`` reads the
    stored one) and the threshold (None: the calibration's own; 0: never withhold)."""

    calibration: Calibration | None = None
    min_confidence: float | None = None


# search(question vector (dim,), k, filters) → hits, run in a thread
Search = Callable[[np.ndarray, int, Any], list[Any]]


class RagHandler:
    """``/rag``: the question embedded, the corpus searched, the chunks screened, the answer
    generated and scored; one shared generation per identical request, cached."""

    def __init__(
        self,
        ctx: GatewayContext,
        embeddings: EmbeddingsHandler,
        *,
        chunk_screen: Any = None,
        policy: RagPolicy = RagPolicy(),
    ) -> None:
        self.ctx, self.embeddings = ctx, embeddings
        self.chunk_screen, self.policy = chunk_screen, policy
        self.flight = SingleFlight()

    async def answer(
        self, request: dict[str, Any], search: Search, filters: Any, t0: float
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Answer ``request["question"]`` from the corpus: retrieval (``search``: vector, k,
        filters → hits), a prompt with the chunks, one shared generation per identical request."""
        ctx, question, answer_id = self.ctx, request["question"], new_answer_id()
        key = cache_key("rag", ctx.model.label, {**request, "shape": RAG_ANSWER_SHAPE})
        hit = await ctx.cached("rag", key)
        if hit is not None:  # cached answers passed the guard when they were made
            ctx.log(
                "rag", question, t0, answer=hit["answer"], cache_hit=True, guard="cached",
                retrieval_scores=[s["score"] for s in hit["sources"]], answer_id=answer_id,
                sources=_given(hit), model=hit.get("model", ctx.model.label),
            )  # fmt: skip
            return hit, ctx.headers("hit", 0.0, hit.get("model"), answer_id)
        await ctx.screen("rag", [question], t0)
        done, shared = await self.flight.run(key, lambda: self._make(request, search, filters, key))
        answer = done["answer"]
        ctx.model.show(answer["model"])
        prompt_tokens = answer["prompt_tokens"] + done["embed_tokens"]
        cost = 0.0
        if shared:
            SHARED.labels(endpoint="rag").inc()
        else:
            cost = ctx.account("rag", prompt_tokens, answer["completion_tokens"], done["compute_s"])
            ctx.trace(ServedAnswer(answer_id=answer_id, model=answer["model"], answer=answer["answer"],
                                   ended_ns=time.time_ns(), extra={"kind": answer["kind"],
                                   "confidence": answer["confidence"]}, **done["trace"]))  # fmt: skip
        ctx.log(
            "rag", question, t0, answer=answer["answer"], prompt_tokens=prompt_tokens,
            completion_tokens=answer["completion_tokens"], cost_usd=cost,
            retrieval_scores=done["scores"], model=answer["model"], answer_id=answer_id,
            sources=_given(answer),
        )  # fmt: skip
        state = "shared" if shared else "miss"
        return answer, ctx.headers(state, cost, answer["model"], answer_id)

    async def _retrieve(
        self, request: dict[str, Any], search: Search, filters: Any
    ) -> tuple[Embedded, list[Any]]:
        """The question's embedding and the hits for it, within the timeout."""
        (emb,) = await self.embeddings.embed([request["question"]])
        try:
            hits = await asyncio.wait_for(
                asyncio.to_thread(search, emb.vector, request["k"], filters), self.ctx.timeout_s
            )
        except TimeoutError:
            raise timed_out("retrieval", self.ctx.timeout_s) from None
        return emb, hits

    async def _make(
        self, request: dict[str, Any], search: Search, filters: Any, key: str | None
    ) -> dict[str, Any]:
        """One answer, cached under ``key``; what every caller sharing it receives."""
        ctx, question = self.ctx, request["question"]
        started = time.time_ns()
        emb, hits = await self._retrieve(request, search, filters)
        retrieved = (started, time.time_ns())
        # Chunks that try to instruct the model are dropped (indirect injection); a random
        # canary in the system prompt tells when an answer repeats it.
        prompt = await asyncio.to_thread(
            prepare, question, hits, screen=self.chunk_screen, canary=new_canary()
        )
        if prompt.screened:
            SCREENED_CHUNKS.labels(endpoint="rag").inc(prompt.screened)
        item = {"messages": prompt.messages, "max_tokens": request["max_tokens"],
                "temperature": 0.0, "top_p": 1.0}  # fmt: skip
        generating = time.time_ns()
        out = await ctx.generate(item)
        generated = (generating, time.time_ns())
        answer = make_answer(
            question, prompt.hits, out["text"], out["prompt_tokens"], out["completion_tokens"],
            calibration=self.policy.calibration, min_confidence=self.policy.min_confidence,
            screened=prompt.screened, canary=prompt.canary,
        ).to_dict()  # fmt: skip
        if answer["leak"]:
            ANSWER_LEAKS.labels(endpoint="rag", how=answer["leak"]).inc()
        answer["model"] = out.get("model", ctx.model.label)
        await ctx.remember(key, answer)
        compute = out.get("compute_s", 0.0) + emb.compute_s
        trace = {
            "endpoint": "rag", "question": question, "messages": prompt.messages,
            "started_ns": started, "retrieve_ns": retrieved, "generate_ns": generated,
            "prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
            "chunks": [{"chunk_id": h.chunk_id, "source": h.source, "title": h.title,
                        "text": h.text, "score": h.score} for h in prompt.hits],
        }  # fmt: skip
        return {"answer": answer, "compute_s": compute, "embed_tokens": emb.tokens,
                "scores": [h.score for h in hits], "trace": trace}  # fmt: skip


def _given(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks an answer was given, as the traffic log keeps them."""
    return [
        {"chunk_id": s.get("chunk_id"), "source": s.get("source"), "score": s.get("score")}
        for s in answer.get("sources", [])
    ]


# -- RAG through the OpenAI API (model ``refinery-rag``) ---------------------------------------
def rag_question(messages: Sequence[dict[str, str]]) -> str:
    """The question a ``refinery-rag`` chat asks: its last user message (400 without one)."""
    turns = [m["content"].strip() for m in messages if m["role"] == "user"]
    if not turns or not turns[-1]:
        raise ApiError(400, f"model {RAG_MODEL!r} answers the last user message, and there is "
                       "none or it is empty", param="messages", code="no_question")  # fmt: skip
    if len(turns[-1]) > RAG_MAX_QUESTION_CHARS:
        raise ApiError(400, f"the question has {len(turns[-1])} characters; {RAG_MODEL!r} takes "
                       f"at most {RAG_MAX_QUESTION_CHARS}", param="messages",
                       code="prompt_too_long")  # fmt: skip
    return turns[-1]


def rag_chat_fields(answer: dict[str, Any]) -> dict[str, Any]:
    """What a ``refinery-rag`` completion adds to OpenAI's body: the sources, the confidence
    and what the content is (``kind``: answer, quote, none or refused)."""
    return {
        "sources": [
            {k: s[k] for k in ("source", "title", "chunk_id", "score")} for s in answer["sources"]
        ],
        "confidence": answer["confidence"],
        "kind": answer["kind"],
    }


def rag_chat_response(answer: dict[str, Any], answer_id: str | None = None) -> dict[str, Any]:
    """A /rag answer as a chat completion: its text the assistant's message, its sources,
    confidence and kind extra top-level fields (the openai client keeps them in
    ``model_extra``); its id ``chatcmpl-<answer_id>``."""
    payload = chat_response(
        RAG_MODEL, answer["answer"], "stop", answer["prompt_tokens"], answer["completion_tokens"],
        answer_id,
    )  # fmt: skip
    return {**payload, **rag_chat_fields(answer)}


async def rag_chat_stream(
    answer: dict[str, Any], options: dict[str, Any], answer_id: str | None = None
) -> AsyncIterator[str]:
    """A /rag answer as server-sent chunks: the answer is scored (and maybe withheld) only once
    it is whole, so it comes as one content chunk, then the finish chunk carrying the sources,
    confidence and kind, the usage when asked, and [DONE]."""
    chunk_id = f"chatcmpl-{answer_id or uuid.uuid4().hex}"
    yield _sse(chat_chunk(chunk_id, RAG_MODEL, {"role": "assistant", "content": ""}))
    yield _sse(chat_chunk(chunk_id, RAG_MODEL, {"content": answer["answer"]}))
    yield _sse({**chat_chunk(chunk_id, RAG_MODEL, {}, "stop"), **rag_chat_fields(answer)})
    if options.get("include_usage"):
        prompt, completion = answer["prompt_tokens"], answer["completion_tokens"]
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}  # fmt: skip
        yield _sse({**chat_chunk(chunk_id, RAG_MODEL, {}, None, usage), "choices": []})
    yield "data: [DONE]\n\n"


# -- the facade the service holds -----------------------------------------------------------------
class Gateway:
    """The context and the three handlers, built from one set of arguments; the service calls
    its methods (each one a handler's)."""

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
        rag_policy: RagPolicy = RagPolicy(),
        traces: ServedTraces | None = None,
    ) -> None:
        self.context = GatewayContext(
            chat=chat, cache=cache, traffic=traffic, limits=limits, hourly_price=hourly_price,
            model=ModelIdentity(model_id, model_label, variant, follow), screen_fn=screen,
            timeout_s=timeout_s, traces=traces,
        )  # fmt: skip
        self.chat_handler = ChatHandler(self.context)
        self.embeddings_handler = EmbeddingsHandler(
            self.context, encode=encode, count_tokens=count_tokens,
            model_name=embedding_model, max_batch=embed_batch,
        )  # fmt: skip
        self.rag_handler = RagHandler(
            self.context, self.embeddings_handler, chunk_screen=chunk_screen,
            policy=rag_policy,
        )  # fmt: skip

    # -- the model answering ---------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.context.model.model_id

    @property
    def model_label(self) -> str:
        return self.context.model.label

    async def refresh_label(self) -> None:
        await self.context.model.refresh(self.context.chat)

    def show_model(self, label: str) -> None:
        self.context.model.show(label)

    def check_model(self, model: str | None) -> None:
        self.context.model.check(model)

    # -- shared steps the routes call ------------------------------------------------------------
    def headers(
        self, cache: str, cost: float, label: str | None = None, answer_id: str | None = None
    ) -> dict[str, str]:
        return self.context.headers(cache, cost, label, answer_id)

    async def screen(self, endpoint: str, texts: list[str], t0: float) -> None:
        await self.context.screen(endpoint, texts, t0)

    # -- the endpoints ---------------------------------------------------------------------------
    async def chat_completion(
        self, item: dict[str, Any], t0: float
    ) -> tuple[dict[str, Any], dict[str, str]]:
        return await self.chat_handler.completion(item, t0)

    async def open_stream(self, item: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        return await self.chat_handler.open_stream(item)

    def chat_stream(
        self,
        events: AsyncIterator[dict[str, Any]],
        item: dict[str, Any],
        options: dict[str, Any],
        t_start: float,
        answer_id: str,
    ) -> AsyncIterator[str]:
        return self.chat_handler.stream(events, item, options, t_start, answer_id)

    @property
    def embedder(self) -> MicroBatcher[str, Embedded]:
        return self.embeddings_handler.batcher

    async def embed(self, texts: list[str]) -> list[Embedded]:
        return await self.embeddings_handler.embed(texts)

    async def embeddings(self, texts: list[str], t0: float) -> tuple[list[str], int, str, float]:
        return await self.embeddings_handler.embeddings(texts, t0)

    async def rag(
        self, request: dict[str, Any], search: Search, filters: Any, t0: float
    ) -> tuple[dict[str, Any], dict[str, str]]:
        return await self.rag_handler.answer(request, search, filters, t0)

    def close(self) -> None:
        self.embeddings_handler.close()
        self.context.traffic.close()
        if self.context.traces is not None:
            self.context.traces.close()
