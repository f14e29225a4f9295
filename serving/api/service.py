"""The Refinery service: three small BentoML services over the library code.

- ``Embeddings`` (``refinery-embedder``): the sentence model; adaptive batching for ``encode``
  and for the prompt-injection scorer (``screen``).
- ``ChatModel`` (``refinery-chat``): the pinned chat model; adaptive batching over padded
  ``generate``; ``stream`` for token streaming.
- ``Refinery`` (``refinery``, the entry point): the OpenAI-compatible API under ``/v1``
  (a FastAPI app), the RAG endpoint ``POST /rag`` (a BentoML API, so BentoML's client calls it),
  cache, guard, limits, API keys and metrics. It calls the other two through ``bentoml.depends``:
  their dispatchers gather concurrent calls into batches.

What a Bento serves is pinned in ``serving/pins.json`` (written by ``serving.api.bento``). BentoML
fixes models and batching parameters when a class is defined, so this module reads its pins and
the ``REFINERY_*`` batching variables at import; nothing else happens at import.
"""

import asyncio
import base64
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import aiohttp  # BentoML's client for calls between services
import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from serving.api.accounting import price_per_hour, request_cost
from serving.api.bento import Pins, read_mlflow_model
from serving.api.cache import cache_key, make_cache
from serving.api.openai_schema import (
    ApiError,
    ChatCompletionRequest,
    EmbeddingRequest,
    Limits,
    chat_chunk,
    chat_response,
    embedding_response,
)
from serving.api.traffic import TrafficLog, TrafficSettings

log = logging.getLogger("refinery.service")

PINS = Pins.load()
_ENV = dict(os.environ)
BATCHING = _ENV.get("REFINERY_BATCHING", "on") != "off"
# From measurements on 2 CPU cores: MiniLM reaches its in-process limit at batch 32
# (ENVIRONMENT.md); padded batches of 16 generate 5.8x as many answers per second as one at a
# time (benchmarks/results/serving.md). Latency budgets: at 32 concurrent clients, 5 s let
# the embedding dispatcher take every request, while 0.5 s made it shed 22 of 640 (503).
EMBED_MAX_BATCH = int(_ENV.get("REFINERY_EMBED_MAX_BATCH", 32))
EMBED_MAX_LATENCY_MS = int(_ENV.get("REFINERY_EMBED_MAX_LATENCY_MS", 5_000))
CHAT_MAX_BATCH = int(_ENV.get("REFINERY_CHAT_MAX_BATCH", 16))
CHAT_MAX_LATENCY_MS = int(_ENV.get("REFINERY_CHAT_MAX_LATENCY_MS", 60_000))
RETRY_AFTER_S = "1"
# Follow a registry alias (e.g. "champion"): load the version it points to when it moves
# (serving/follow.py). Empty: serve the pinned version only.
FOLLOW_ALIAS = _ENV.get("REFINERY_FOLLOW_ALIAS", "")
FOLLOW_INTERVAL_S = float(_ENV.get("REFINERY_FOLLOW_INTERVAL_S", 30))
LABEL_REFRESH_S = 2.0  # how often the entry service asks which model version answers
RAG_DEFAULT_TOKENS = 96  # (capped at REFINERY_MAX_TOKENS)


def _pins() -> Pins:
    if PINS is None:
        raise RuntimeError(
            "serving/pins.json is missing: serve a built Bento (`refinery serve`, after "
            "`refinery bento` or `make run`), not the checkout"
        )
    return PINS


def _torch_threads() -> None:
    threads = _ENV.get("REFINERY_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


# --- metrics (BentoML's /metrics serves these beside its own) -------------------------------
TOKENS = bentoml.metrics.Counter(
    name="refinery_tokens_total",
    documentation="Tokens in (prompt) and out (completion), by endpoint.",
    labelnames=["endpoint", "direction"],
)
CACHE = bentoml.metrics.Counter(
    name="refinery_cache_requests_total",
    documentation="Response cache lookups: hit, miss, or error (cache unavailable).",
    labelnames=["endpoint", "result"],
)
COST = bentoml.metrics.Counter(
    name="refinery_cost_usd_total",
    documentation="Estimated cost (compute seconds x REFINERY_PRICE_PER_HOUR / 3600).",
    labelnames=["endpoint"],
)
REQUEST_COST = bentoml.metrics.Histogram(
    name="refinery_request_cost_usd",
    documentation="Estimated cost per request.",
    labelnames=["endpoint"],
    buckets=(1e-7, 1e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 1e-2),
)
GUARD_BLOCKS = bentoml.metrics.Counter(
    name="refinery_guard_blocks_total",
    documentation="Requests blocked by the prompt-injection guard, by reason.",
    labelnames=["endpoint", "reason"],
)
TRAFFIC_DROPPED = bentoml.metrics.Counter(
    name="refinery_traffic_log_dropped_total",
    documentation="Traffic log rows dropped (queue full, database unavailable); requests are unaffected",
    labelnames=["reason"],
)
REJECTED = bentoml.metrics.Counter(
    name="refinery_rejected_requests_total",
    documentation="Requests refused before any model ran, by reason.",
    labelnames=["reason"],
)


# --- the model services ------------------------------------------------------------------
@bentoml.service(name="refinery-embedder", workers=1, traffic={"timeout": 120})
class Embeddings:
    if PINS is not None:
        model = bentoml.models.BentoModel(PINS.embedding_model_tag)

    def __init__(self) -> None:
        from serving.corpus.embedding import Embedder
        from serving.guard import InjectionGuard

        _torch_threads()
        pins = _pins()
        self.embedder = Embedder(pins.embedding_model, location=self.model.path)
        self.tokenizer = self.embedder.tokenizer()
        self.guard = InjectionGuard(self.embedder.encode)  # embeds its exemplars: a warm-up too

    @bentoml.api(
        batchable=BATCHING, max_batch_size=EMBED_MAX_BATCH, max_latency_ms=EMBED_MAX_LATENCY_MS
    )
    def encode(self, texts: list[str]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        vectors = self.embedder.encode(texts)  # (n, dim)
        share = (time.perf_counter() - t0) / max(1, len(texts))
        tokens = [sum(e.attention_mask) for e in self.tokenizer.encode_batch(texts)]  # no padding
        return [
            {"embedding": _b64(v), "tokens": n, "compute_s": share}
            for v, n in zip(vectors, tokens, strict=True)
        ]

    @bentoml.api(
        batchable=BATCHING, max_batch_size=EMBED_MAX_BATCH, max_latency_ms=EMBED_MAX_LATENCY_MS
    )
    def screen(self, texts: list[str]) -> list[dict[str, Any]]:
        return [v.to_dict() for v in self.guard.check(texts)]


@bentoml.service(name="refinery-chat", workers=1, traffic={"timeout": 300})
class ChatModel:
    if PINS is not None:
        model = bentoml.models.BentoModel(PINS.chat_model_tag)

    def __init__(self) -> None:
        import torch

        _torch_threads()
        self.cuda = torch.cuda.is_available()
        pins = _pins()
        # (generator, "name/version"): one attribute, so a swap is one assignment and a batch
        # never pairs one version's generator with another's label.
        self.active: tuple[Any, str] = (self._load(Path(self.model.path)), pins.model_label)
        self.follower = None
        if FOLLOW_ALIAS:
            from refinery.settings import Settings
            from serving.runtime.follow import AliasFollower

            env = dict(os.environ)
            env.setdefault("REFINERY_HOME", pins.refinery_home)
            settings = Settings.from_env(env)
            self.follower = AliasFollower(
                tracking_uri=settings.mlflow_tracking_uri,
                name=pins.registered_model,
                alias=FOLLOW_ALIAS,
                current_version=pins.model_version,
                load=lambda _ref, path: self._load(path),
                on_swap=self._swap,
                workdir=settings.home / "serving" / "follow",
                interval_s=FOLLOW_INTERVAL_S,
            ).start()

    def _load(self, folder: Path) -> Any:
        from serving.runtime.generation import load_generator

        weights, variant = read_mlflow_model(folder)
        device = "cuda" if self.cuda and variant == "none" else "cpu"
        generator = load_generator(weights, variant=variant, device=device)
        generator.generate(["Hello"], max_new_tokens=2)  # warm-up: first call is slow
        return generator

    def _swap(self, ref: Any, generator: Any) -> None:
        # A batch already running holds the old generator until it ends.
        self.active = (generator, ref.label)

    @bentoml.api
    def current_model(self) -> str:
        """The "name/version" that answers now (moves when the followed alias moves)."""
        return self.active[1]

    @bentoml.api(
        batchable=BATCHING, max_batch_size=CHAT_MAX_BATCH, max_latency_ms=CHAT_MAX_LATENCY_MS
    )
    def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each request: messages, max_tokens, temperature, top_p. Requests with the same
        sampling settings share one padded generate call."""
        generator, label = self.active  # one model for the whole batch
        out: list[dict[str, Any] | None] = [None] * len(requests)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((float(r["temperature"]), float(r["top_p"])), []).append(i)
        for (temperature, top_p), idx in groups.items():
            completions = generator.generate(
                [requests[i]["messages"] for i in idx],
                max_new_tokens=[int(requests[i]["max_tokens"]) for i in idx],
                temperature=temperature,
                top_p=top_p,
            )
            for i, c in zip(idx, completions, strict=True):
                out[i] = {
                    "text": c.text,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                    "finish_reason": c.finish_reason,
                    "compute_s": c.seconds / len(idx),
                    "model": label,
                }
        return [o for o in out if o is not None]

    @bentoml.api
    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        generator = self.active[0]
        return len(generator.tokenizer(generator.chat_text(messages)).input_ids)

    @bentoml.api
    async def stream(
        self, messages: list[dict[str, str]], max_tokens: int, temperature: float, top_p: float
    ) -> AsyncGenerator[str, None]:
        generator = self.active[0]
        async for piece in _aiter(generator.stream(messages, max_tokens, temperature, top_p)):
            yield piece


def _b64(vector: np.ndarray) -> str:
    """A vector as OpenAI's base64 encoding: little-endian float32 bytes. Compact between the
    services and in the cache, and what the openai client asks for by default."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _unb64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")  # (dim,)


async def _aiter(pieces: Any) -> AsyncIterator[str]:
    """A blocking iterator as an async one (each next() in a thread)."""
    done = object()
    while True:
        piece = await asyncio.to_thread(next, pieces, done)
        if piece is done:
            return
        yield str(piece)


# --- the gateway -------------------------------------------------------------------------
openai_app = FastAPI(
    title="Refinery OpenAI-compatible API",
    description="Chat completions (with streaming), embeddings and models, for the official "
    "openai client. Errors use OpenAI's body: {error: {message, type, param, code}}.",
    version="1",
)


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@openai_app.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return _error_response(err)


@openai_app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        return _error_response(
            ApiError(400, "the request body is not valid JSON", code="invalid_json")
        )
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
    return _error_response(ApiError(400, message, param=where or None, code="invalid_value"))


class RagFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list, max_length=50, description="corpus paths; * is a wildcard"
    )
    formats: list[str] = Field(default_factory=list, max_length=10)
    doc_ids: list[str] = Field(default_factory=list, max_length=100)


@bentoml.service(
    name="refinery",
    workers=1,
    traffic={"timeout": 300},
    labels={"project": "refinery"},
)
@bentoml.asgi_app(openai_app, path="/v1")
class Refinery:
    embedder = bentoml.depends(Embeddings)
    chat = bentoml.depends(ChatModel)

    def __init__(self) -> None:
        env = dict(os.environ)
        self.pins = _pins()
        self.limits = Limits.from_env(env)
        self.hourly_price = price_per_hour(env)
        self.guard_mode = env.get("REFINERY_GUARD", "block")  # block | off
        if self.guard_mode not in ("block", "off"):
            raise ValueError(f"REFINERY_GUARD must be 'block' or 'off', got {self.guard_mode!r}")
        self.cache = make_cache(
            env.get("REFINERY_REDIS_URL") or None,
            ttl_s=float(env.get("REFINERY_CACHE_TTL_S", 600)),
        )
        self.model_id = self.pins.registered_model
        self.model_label = self.pins.model_label  # moves when the chat service follows an alias
        self._label_checked = 0.0
        self._retrieval: tuple[Any, Any] | None = None
        self.traffic = TrafficLog(
            self._new_engine,
            TrafficSettings.from_env(env),
            on_drop=lambda reason, n: TRAFFIC_DROPPED.labels(reason=reason).inc(n),
        )
        log.info(
            "serving %s (variant %s), cache %s",
            self.pins.model_label,
            self.pins.variant,
            self.cache.backend,
        )

    # -- helpers --
    def _account(self, endpoint: str, prompt: int, completion: int, compute_s: float) -> float:
        cost = request_cost(compute_s, self.hourly_price)
        TOKENS.labels(endpoint=endpoint, direction="in").inc(prompt)
        if completion:
            TOKENS.labels(endpoint=endpoint, direction="out").inc(completion)
        COST.labels(endpoint=endpoint).inc(cost)
        REQUEST_COST.labels(endpoint=endpoint).observe(cost)
        return cost

    async def _refresh_label(self) -> None:
        """When the chat service follows an alias, learn (every few seconds) which version answers,
        so that cache keys and headers name the model that will answer."""
        now = time.monotonic()
        if FOLLOW_ALIAS and now - self._label_checked > LABEL_REFRESH_S:
            self._label_checked = now
            self.model_label = await _call(self.chat.to_async.current_model)

    def _answered_by(self, out: dict[str, Any]) -> str:
        self.model_label = out.get("model", self.model_label)
        return self.model_label

    def _log(self, endpoint: str, prompt: str, t0: float, **fields: Any) -> None:
        """One traffic-log row (sampled, queued; written by a background thread)."""
        fields.setdefault("guard", "off" if self.guard_mode == "off" else "passed")
        self.traffic.record(
            endpoint=endpoint,
            model=fields.pop("model", self.model_label),
            prompt=prompt,
            latency_s=time.perf_counter() - t0,
            **fields,
        )

    async def _cache_io(self, method: Any, *args: Any) -> Any:
        if self.cache.backend == "memory":  # a dict lookup: no thread hop
            return method(*args)
        return await asyncio.to_thread(method, *args)  # Redis: network I/O off the loop

    async def _cached(self, endpoint: str, key: str | None) -> Any:
        if key is None:
            return None
        outcome, value = await self._cache_io(self.cache.get, key)
        CACHE.labels(endpoint=endpoint, result=outcome).inc()
        return value

    async def _remember(self, key: str | None, value: Any) -> None:
        if key is not None:
            await self._cache_io(self.cache.set, key, value)

    async def _screen(self, endpoint: str, texts: list[str], t0: float) -> None:
        if self.guard_mode == "off" or not texts:
            return
        verdicts = await _call(self.embedder.to_async.screen, texts)
        for v in verdicts:
            if v["blocked"]:
                for reason in v["reasons"]:
                    GUARD_BLOCKS.labels(endpoint=endpoint, reason=reason).inc()
                self._log(endpoint, "\n".join(texts), t0, answer=None, status=400, guard="blocked")
                raise ApiError(
                    400,
                    "the request looks like a prompt injection and was blocked "
                    f"({', '.join(v['reasons'])})",
                    type="invalid_request_error",
                    code="prompt_injection",
                )

    def _check_model(self, model: str | None) -> None:
        if model and model not in (self.model_id, self.model_label, "refinery", "default"):
            raise ApiError(
                404,
                f"model {model!r} is not served here; GET /v1/models lists {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def _headers(self, cache: str, cost: float, label: str | None = None) -> dict[str, str]:
        return {
            "x-refinery-model-version": label or self.model_label,
            "x-refinery-cache": cache,
            "x-refinery-cost-usd": f"{cost:.8f}",
        }

    # -- OpenAI-compatible API --
    @openai_app.get("/models")
    async def models(self) -> dict[str, Any]:
        await self._refresh_label()
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "refinery",
                    "version": self.model_label.rsplit("/", 1)[-1],
                    "variant": self.pins.variant,
                },
                {
                    "id": self.pins.embedding_model,
                    "object": "model",
                    "created": 0,
                    "owned_by": "refinery",
                },
            ],
        }

    @openai_app.post("/chat/completions", response_model=None)
    async def chat_completions(
        self, body: ChatCompletionRequest
    ) -> JSONResponse | StreamingResponse:
        t0 = time.perf_counter()
        await self._refresh_label()
        self._check_model(body.model)
        messages = body.plain_messages(self.limits)
        max_tokens = body.token_limit(self.limits)
        item = {
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
        }
        user_turns = [m["content"] for m in messages if m["role"] == "user"]
        if body.stream:
            await self._screen("chat", user_turns, t0)
            return StreamingResponse(
                self._stream(item, body.stream_options or {}, t0),
                media_type="text/event-stream",
                headers={"x-refinery-model-version": self.model_label},
            )
        key = cache_key("chat", self.model_label, item) if body.temperature == 0 else None
        hit = await self._cached("chat", key)
        prompt = user_turns[-1] if user_turns else ""
        if hit is not None:  # cached answers passed the guard when they were made
            self._log("chat", prompt, t0, answer=hit["text"], cache_hit=True, guard="cached")
            return JSONResponse(
                chat_response(self.model_id, **hit), headers=self._headers("hit", 0.0)
            )
        await self._screen("chat", user_turns, t0)
        (out,) = await _call(self.chat.to_async.generate, [item])
        label = self._answered_by(out)
        result = {
            "text": out["text"],
            "finish": out["finish_reason"],
            "prompt_tokens": out["prompt_tokens"],
            "completion_tokens": out["completion_tokens"],
        }
        cost = self._account(
            "chat", out["prompt_tokens"], out["completion_tokens"], out["compute_s"]
        )
        await self._remember(key, result)
        self._log(
            "chat",
            prompt,
            t0,
            answer=out["text"],
            prompt_tokens=out["prompt_tokens"],
            completion_tokens=out["completion_tokens"],
            cost_usd=cost,
            model=label,
        )
        return JSONResponse(
            chat_response(self.model_id, **result), headers=self._headers("miss", cost, label)
        )

    async def _stream(
        self, item: dict[str, Any], options: dict[str, Any], t_start: float
    ) -> AsyncIterator[str]:
        chunk_id = f"chatcmpl-{uuid.uuid4().hex}"

        def sse(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        yield sse(chat_chunk(chunk_id, self.model_id, {"role": "assistant", "content": ""}))
        t0, pieces = time.perf_counter(), []
        try:
            prompt_tokens = await _call(self.chat.to_async.count_tokens, item["messages"])
            stream = self.chat.to_async.stream(
                item["messages"], item["max_tokens"], item["temperature"], item["top_p"]
            )
            async for piece in stream:
                pieces.append(piece)
                yield sse(chat_chunk(chunk_id, self.model_id, {"content": piece}))
        except (ApiError, bentoml.exceptions.BentoMLException, aiohttp.ClientError) as err:
            # Headers are gone once a stream has started: report the error in-band, as an
            # SSE event with OpenAI's error body, and end the stream.
            error = (
                err if isinstance(err, ApiError) else ApiError(503, str(err), type="server_error")
            )
            yield sse(error.body())
            return
        text = "".join(pieces)
        completion_tokens = await _call(
            self.chat.to_async.count_tokens, [{"role": "assistant", "content": text}]
        )
        # The streamed answer runs alone on the model: all its wall time is its compute time.
        cost = self._account("chat", prompt_tokens, completion_tokens, time.perf_counter() - t0)
        turns = [m["content"] for m in item["messages"] if m["role"] == "user"]
        self._log(
            "chat",
            turns[-1] if turns else "",
            t_start,
            answer=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
        )
        finish = "length" if completion_tokens >= item["max_tokens"] else "stop"
        yield sse(chat_chunk(chunk_id, self.model_id, {}, finish))
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

    @openai_app.post("/embeddings")
    async def embeddings(self, body: EmbeddingRequest) -> JSONResponse:
        if body.model and body.model not in (self.pins.embedding_model, self.model_id):
            self._check_model(body.model)
        t0 = time.perf_counter()
        texts = body.texts(self.limits)
        key = cache_key("embeddings", self.pins.embedding_model, {"input": texts})
        hit = await self._cached("embeddings", key)
        cost = 0.0
        if hit is None:
            rows = await _call(self.embedder.to_async.encode, texts)
            hit = {
                "vectors": [r["embedding"] for r in rows],
                "tokens": sum(r["tokens"] for r in rows),
            }
            cost = self._account("embeddings", hit["tokens"], 0, sum(r["compute_s"] for r in rows))
            await self._remember(key, hit)
            state = "miss"
        else:
            state = "hit"
        vectors = hit["vectors"]  # base64 float32: what the openai client asks for by default
        dim = len(base64.b64decode(vectors[0])) // 4
        if body.dimensions is not None and body.dimensions != dim:
            raise ApiError(
                400,
                f"this model makes {dim}-dimensional vectors; "
                f"dimensions={body.dimensions} is not supported",
                param="dimensions",
            )
        self._log(
            "embeddings",
            "\n".join(texts),
            t0,
            answer=None,
            prompt_tokens=hit["tokens"],
            cost_usd=cost,
            cache_hit=state == "hit",
            guard="off",  # embeddings are not screened
        )
        data: list[Any] = vectors
        if body.encoding_format == "float":
            data = [_unb64(v).tolist() for v in vectors]
        return JSONResponse(
            embedding_response(self.pins.embedding_model, data, hit["tokens"]),
            headers=self._headers(state, cost),
        )

    # -- RAG --
    @bentoml.api(route="/rag")
    async def rag(
        self,
        question: Annotated[str, Field(min_length=1, max_length=4000)],
        k: Annotated[int, Field(ge=1, le=20)] = 3,
        filters: RagFilters | None = None,
        max_tokens: Annotated[int | None, Field(ge=1, le=4096)] = None,
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Answer a question from the corpus: the answer, its sources (document, chunk,
        score) and a confidence in [0, 1] (see serving/rag.py for how it is computed)."""
        try:
            limit = max_tokens or min(RAG_DEFAULT_TOKENS, self.limits.max_tokens)
            return await self._rag(question, k, filters, limit, ctx)
        except ApiError as err:
            ctx.response.status_code = err.status
            for name, value in err.headers.items():
                ctx.response.headers[name] = value
            return err.body()

    async def _rag(
        self, question: str, k: int, filters: RagFilters | None, max_tokens: int, ctx: Any
    ) -> dict[str, Any]:
        from serving.corpus.retrieval import Filters, search
        from serving.rag import build_messages, make_answer

        t0 = time.perf_counter()
        await self._refresh_label()
        question = question.strip()
        if not question:
            raise ApiError(400, "the question is empty", param="question")
        if max_tokens > self.limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens is {max_tokens}; this service allows at most {self.limits.max_tokens}",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        f = filters or RagFilters()
        request = {
            "question": question,
            "k": k,
            "filters": f.model_dump(),
            "max_tokens": max_tokens,
        }
        key = cache_key("rag", self.model_label, request)
        hit = await self._cached("rag", key)
        if hit is not None:  # cached answers passed the guard when they were made
            ctx.response.headers.update(self._headers("hit", 0.0))
            self._log(
                "rag",
                question,
                t0,
                answer=hit["answer"],
                cache_hit=True,
                guard="cached",
                retrieval_scores=[s["score"] for s in hit["sources"]],
            )
            return hit
        await self._screen("rag", [question], t0)
        engine, space = await asyncio.to_thread(self._retrieval_state)
        (row,) = await _call(self.embedder.to_async.encode, [question])
        hits = await asyncio.to_thread(  # hybrid: full-text and vector search, fused
            search,
            engine,
            space,
            _unb64(row["embedding"]),
            question,
            k,
            Filters(tuple(f.sources), tuple(f.formats), tuple(f.doc_ids)),
        )
        item = {
            "messages": build_messages(question, hits),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "top_p": 1.0,
        }
        (out,) = await _call(self.chat.to_async.generate, [item])
        answer = make_answer(
            question, hits, out["text"], out["prompt_tokens"], out["completion_tokens"]
        ).to_dict()
        answer["model"] = self._answered_by(out)
        cost = self._account(
            "rag",
            out["prompt_tokens"] + row["tokens"],
            out["completion_tokens"],
            out["compute_s"] + row["compute_s"],
        )
        await self._remember(key, answer)
        ctx.response.headers.update(self._headers("miss", cost, answer["model"]))
        self._log(
            "rag",
            question,
            t0,
            answer=answer["answer"],
            prompt_tokens=out["prompt_tokens"] + row["tokens"],
            completion_tokens=out["completion_tokens"],
            cost_usd=cost,
            retrieval_scores=[h.score for h in hits],
            model=answer["model"],
        )
        return answer

    def _new_engine(self) -> Any:
        """An engine on Refinery's database (REFINERY_DATABASE_URL, else the embedded one)."""
        import sqlalchemy as sa

        from refinery.settings import Settings
        from refinery.stores import database_url

        env = dict(os.environ)
        env.setdefault("REFINERY_HOME", self.pins.refinery_home)
        return sa.create_engine(
            database_url(Settings.from_env(env)),
            pool_pre_ping=True,
            connect_args={"connect_timeout": 3},
        )

    def _retrieval_state(self) -> tuple[Any, Any]:
        """The database engine and the embedding space (once; the space must exist)."""
        if self._retrieval is None:
            from serving.corpus.vectorstore import VectorStore

            try:
                store = VectorStore(self._new_engine())
                space = store.find_space(self.pins.embedding_model)
            except Exception as err:
                raise ApiError(
                    503,
                    f"the document store is unavailable: {err}",
                    type="server_error",
                    headers={"Retry-After": "5"},
                ) from err
            if space is None:
                raise ApiError(
                    503,
                    f"no documents embedded with {self.pins.embedding_model!r} yet: "
                    "run `refinery ingest` first",
                    type="server_error",
                    code="no_documents",
                    headers={"Retry-After": "30"},
                )
            self._retrieval = (store.engine, space)
        return self._retrieval


CONNECTION_RETRIES = 2


async def _call(method: Any, *args: Any) -> Any:
    """Call a dependency; its overload (503) becomes ours, with Retry-After.

    A dropped connection is retried: the pool reuses keep-alive connections that the model
    service may have just closed as idle (a race, seen under bursts after a pause), and every
    model call is free of side effects.
    """
    for attempt in range(CONNECTION_RETRIES + 1):
        try:
            return await method(*args)
        except aiohttp.ClientError as err:
            if attempt == CONNECTION_RETRIES:
                REJECTED.labels(reason="model_unreachable").inc()
                raise ApiError(
                    503,
                    f"the model service did not answer ({type(err).__name__}); retry shortly",
                    type="server_error",
                    code="model_unavailable",
                    headers={"Retry-After": RETRY_AFTER_S},
                ) from err
        except bentoml.exceptions.BentoMLException as err:
            status = int(getattr(err, "error_code", 500))
            if status == 503:
                REJECTED.labels(reason="model_overloaded").inc()
                raise ApiError(
                    503,
                    "the model is busy; retry shortly",
                    type="server_error",
                    code="overloaded",
                    headers={"Retry-After": RETRY_AFTER_S},
                ) from err
            raise
    raise AssertionError("unreachable")


class GatewayMiddleware:
    """Before any route: API keys (401), body size (413) and requests in flight (503)."""

    PROTECTED = ("/v1/", "/rag")
    OPEN = ("/v1/openapi.json", "/v1/docs")

    def __init__(self, app: Any) -> None:
        env = dict(os.environ)
        self.app = app
        self.limits = Limits.from_env(env)
        self.keys = [
            k.strip().encode() for k in env.get("REFINERY_API_KEYS", "").split(",") if k.strip()
        ]
        self.inflight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(self.PROTECTED) or path in self.OPEN:
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v for k, v in scope.get("headers", [])}
        if self.keys and not self._authorized(headers):
            REJECTED.labels(reason="unauthorized").inc()
            await _send_error(
                send,
                ApiError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                ),
            )
            return
        if self.inflight >= self.limits.max_inflight:
            REJECTED.labels(reason="overloaded").inc()
            await _send_error(
                send,
                ApiError(
                    503,
                    f"{self.inflight} requests in progress; retry shortly",
                    type="server_error",
                    code="overloaded",
                    headers={"Retry-After": RETRY_AFTER_S},
                ),
            )
            return
        body, too_large = await self._read_body(headers, receive)
        if too_large:
            REJECTED.labels(reason="body_too_large").inc()
            await _send_error(
                send,
                ApiError(
                    413,
                    f"the request body is larger than {self.limits.max_body_bytes} bytes",
                    code="body_too_large",
                ),
            )
            return
        self.inflight += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.inflight -= 1

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        auth = headers.get("authorization", b"")
        given = (
            auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get("x-api-key", b"")
        )
        return any(hmac.compare_digest(given, key) for key in self.keys)

    async def _read_body(self, headers: dict[str, bytes], receive: Any) -> tuple[bytes, bool]:
        limit = self.limits.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return b"", True
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", True
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(parts), False


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send: Any, err: ApiError) -> None:
    payload = json.dumps(err.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


Refinery.add_asgi_middleware(GatewayMiddleware)  # type: ignore[attr-defined]
