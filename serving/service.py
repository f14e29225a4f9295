"""The Refinery service: two BentoML services over the library code.

- ``ChatModel`` (``refinery-chat``): the pinned chat model in a generation engine with
  continuous batching (``refinery.generation.engine``); its ``generate`` API streams one JSON line
  per piece of text, so chat, RAG and streamed requests share the engine's running batch.
- ``Refinery`` (``refinery``, the entry point): the OpenAI-compatible API under ``/v1``
  (a FastAPI app), the RAG endpoint ``POST /rag`` (a BentoML API, so BentoML's client calls
  it), the embedding model and the guard in-process, cache, single flight, limits, API keys
  and metrics. Its logic is ``serving.gateway.Gateway``; this module wires routes to it.

What a Bento serves is pinned in ``serving/pins.json`` (written by ``serving.bento``).
BentoML fixes models, workers and logging when a class is defined, so this module reads its
pins and its settings (``serving.bento.service_settings``) at import; nothing else happens at
import. The services take the same ``ServingSettings`` object in ``__init__``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import aiohttp  # BentoML's client for calls between services
import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from refinery.core.settings import ServingSettings, Settings
from refinery.rag.confidence import load_calibration
from serving.bento import Pins, service_settings
from serving.gateway import (
    ANSWER_ID_HEADER,
    RAG_DEFAULT_K,
    RAG_DEFAULT_TOKENS,
    RAG_MAX_QUESTION_CHARS,
    RAG_MODEL,
    RETRY_AFTER_S,
    Gateway,
    RagPolicy,
    rag_chat_response,
    rag_chat_stream,
    rag_question,
    unb64,
)
from serving.generations import (
    ImageGenerationRequest,
    ImageModel,
    image_items,
    images_response,
)
from serving.images import rag_image_text, resolve_images, vision_model, with_image_text
from serving.metrics import (
    ENGINE_RUNNING,
    ENGINE_TOKENS,
    ENGINE_WAITING,
    REJECTED,
    SPEC_TOKENS,
    TRACES_DROPPED,
    TRAFFIC_DROPPED,
)
from serving.middleware import GatewayMiddleware
from serving.openai_schema import (
    ApiError,
    ChatCompletionRequest,
    EmbeddingRequest,
    Text,
    embedding_response,
)
from serving.traffic import new_answer_id

log = logging.getLogger("refinery.service")

PINS = Pins.load()
# Fixed when the classes are defined (serving.bento.service_settings says why): access logging
# and the entry's worker count, chosen from the serving benchmark
# (benchmarks/results/serving.md), measured on cache hits at 32 connections.
LOGGING = {"access": {"enabled": service_settings().access_log}}
ENTRY_READY = threading.Event()  # the entry's models are loaded (the middleware checks it)


def _pins() -> Pins:
    if PINS is None:
        raise RuntimeError(
            "serving/pins.json is missing: serve a built Bento (`refinery serve`, after "
            "`refinery bento` or `make run`), not the checkout"
        )
    return PINS


def _store_settings(pins: Pins) -> Settings:
    """Where the stores are: the environment's settings, with the home the Bento was built
    with when REFINERY_HOME is unset."""
    return Settings.from_env(fallback={"REFINERY_HOME": pins.refinery_home})


def _quiet_optional_kernels() -> None:
    # bitsandbytes warns on CPUs with AVX-512 BF16 that an optional hub-downloading package is
    # missing; it is not needed.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# --- the model service -------------------------------------------------------------------
@bentoml.service(name="refinery-chat", workers=1, traffic={"timeout": 300}, logging=LOGGING)
class ChatModel:
    if PINS is not None:
        model = bentoml.models.BentoModel(PINS.chat_model_tag)

    def __init__(self, settings: ServingSettings | None = None) -> None:
        import torch

        from refinery.generation.generator import select_device

        _quiet_optional_kernels()
        self.settings = settings or service_settings()
        # REFINERY_DEVICE: auto | cpu | cuda (the gpu overlay in deploy/k8s sets cuda; it
        # refuses to start without a GPU rather than serve slowly on the CPU).
        self.device = select_device(self.settings.device, torch.cuda.is_available())
        self._exported: dict[str, int] = {}  # engine counters already added to the metrics
        # (engine, "name/version"): one attribute, so a swap is one assignment and a request
        # never pairs one version's engine with another's label. None until the model is
        # loaded: the service answers (503, not ready) at once meanwhile instead of holding
        # connections while it loads.
        self.active: tuple[Any, str] | None = None
        self.load_error: str | None = None
        self.follower: Any = None
        threading.Thread(target=self._start, name="load-model", daemon=True).start()

    def _start(self) -> None:
        pins = _pins()
        try:
            self.active = (self._load(Path(self.model.path)), pins.model_label)
        except Exception as err:
            log.exception("loading the chat model failed")
            self.load_error = f"{type(err).__name__}: {err}"
            return
        # Follow a registry alias (e.g. "champion"): load the version it points to when it
        # moves (serving/follow.py). Empty: serve the pinned version only.
        if self.settings.follow_alias:
            from serving.follow import AliasFollower

            stores = _store_settings(pins)
            self.follower = AliasFollower(
                tracking_uri=stores.mlflow_tracking_uri,
                name=pins.registered_model,
                alias=self.settings.follow_alias,
                current_version=pins.model_version,
                load=lambda _ref, path: self._load(path),
                on_swap=self._swap,
                workdir=stores.home / "serving" / "follow",
                interval_s=self.settings.follow_interval_s,
            ).start()

    def _load(self, folder: Path) -> Any:
        from refinery.core.registry import read_model_folder
        from refinery.generation.engine.loader import load_engine

        s = self.settings
        local = read_model_folder(folder)
        device = self.device if local.variant == "none" else "cpu"
        # Speculative decoding for the whole deployment (OpenVINO engine).
        options: dict[str, Any] = {}
        if s.speculation != "none":
            options["speculation"] = s.speculation
        if s.speculation == "draft_model":
            if local.openvino_draft is None:
                raise ValueError("REFINERY_SPECULATION=draft_model, but this version has no draft")
            options["draft_dir"] = local.openvino_draft
        engine = load_engine(
            local.weights, local.variant, backend=s.engine, device=device,
            threads=s.torch_threads, max_batch=s.chat_max_batch, openvino_dir=local.openvino,
            **options,
        )  # fmt: skip
        engine.generate(["Hello"], max_new_tokens=2)  # warm-up: the first call is slow
        return engine

    def _swap(self, ref: Any, engine: Any) -> None:
        assert self.active is not None
        old = self.active[0]
        self.active = (engine, ref.label)  # new requests go to the new engine from now on
        threading.Thread(target=_retire, args=(old,), daemon=True).start()

    def __is_ready__(self) -> bool:
        return self.active is not None

    def __is_alive__(self) -> bool:
        return self.load_error is None

    @bentoml.api
    def current_model(self) -> str:
        """The "name/version" that answers now (moves when the followed alias moves)."""
        return self.active[1] if self.active else _pins().model_label

    @bentoml.api
    def stats(self) -> dict[str, Any]:
        if self.active is None:
            return {"loading": True}
        s = self.active[0].stats()
        return {**vars(s), "mean_batch": s.mean_batch, "acceptance_rate": s.acceptance_rate}

    @bentoml.api
    async def generate(self, item: dict[str, Any]) -> AsyncGenerator[str, None]:
        """One request (messages, max_tokens, temperature, top_p, stop, seed, speculation);
        one JSON line per piece of text as the engine produces it, the last with
        ``finished``. A request the engine refuses gives one line with ``status`` and
        ``error``. Leaving early (the caller went away) cancels the request in the engine."""
        async for line in self._events(item):
            yield line

    async def _events(self, item: dict[str, Any]) -> AsyncGenerator[str, None]:
        from refinery.generation.engine.base import (
            EngineBusy,
            EngineClosed,
            PromptTooLong,
            SamplingParams,
        )

        if self.active is None:
            yield json.dumps({"status": 503, "error": "the model is loading", "finished": True})
            return
        params = SamplingParams(
            max_tokens=int(item["max_tokens"]),
            temperature=float(item.get("temperature", 0.0)),
            top_p=float(item.get("top_p", 1.0)),
            seed=item.get("seed"),
            stop=tuple(item.get("stop") or ()),
            speculation=item.get("speculation"),
        )
        engine, label = self.active
        try:
            for attempt in range(2):
                try:
                    async for delta in engine.stream(item["messages"], params):
                        event = {"text": delta.text}
                        if delta.finished:
                            event.update(
                                finished=True, finish_reason=delta.finish_reason,
                                error=delta.error, prompt_tokens=delta.prompt_tokens,
                                completion_tokens=delta.completion_tokens,
                                compute_s=delta.compute_s, model=label,
                            )  # fmt: skip
                        yield json.dumps(event) + "\n"
                    break
                except EngineClosed:  # raised before any delta: swapped out between reading
                    if attempt:  # self.active and submitting; the new engine takes it
                        raise
                    engine, label = self.active
        except EngineBusy as err:
            yield json.dumps({"status": 503, "error": str(err), "finished": True}) + "\n"
        except PromptTooLong as err:
            yield json.dumps({"status": 400, "error": str(err), "finished": True}) + "\n"
        finally:
            self._export(engine)

    @bentoml.api
    async def complete(self, item: dict[str, Any]) -> dict[str, Any]:
        """One request answered whole: the events of ``generate`` folded into one dict (the
        text, and the last event's fields). Non-streamed chat and RAG use this plain
        request/response call: it returns its connection to the entry's pool as soon as it
        answers, and nothing depends on reading a stream to its end."""
        pieces: list[str] = []
        last: dict[str, Any] = {}
        async for line in self._events(item):
            last = json.loads(line)
            pieces.append(last.get("text", ""))
        return {**last, "text": "".join(pieces)}

    def _export(self, engine: Any) -> None:
        s = engine.stats()
        ENGINE_WAITING.set(s.waiting)
        ENGINE_RUNNING.set(s.running)
        for name, value, total in (
            ("generated", s.generated_tokens, ENGINE_TOKENS),
            ("proposed", s.draft_proposed, SPEC_TOKENS.labels(outcome="proposed")),
            ("accepted", s.draft_accepted, SPEC_TOKENS.labels(outcome="accepted")),
        ):
            seen = self._exported.get(name, 0)
            if value > seen:
                total.inc(value - seen)
                self._exported[name] = value


def _retire(engine: Any, grace_s: float = 300.0) -> None:
    """Close an engine the service swapped out once its last requests ended."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        # Atomic with submit: a request that read the old engine just before the swap is
        # either counted (and waited for) or refused with EngineClosed and sent to the new one.
        # Checking counters and then closing left such a request on a closed backend, unanswered
        # (seen once in CI: a 504 after 120 s during a swap).
        if engine.close_if_idle():
            return
        time.sleep(0.5)
    engine.close()


class ChatServiceClient:
    """The chat service as the gateway wants it: events as dicts, errors as ``ApiError``."""

    def __init__(self, remote: Any) -> None:
        self.remote = remote

    async def current_model(self) -> str:
        return str(await _call(self.remote.to_async.current_model))

    async def complete(self, item: dict[str, Any]) -> dict[str, Any]:
        """The whole answer in one call (see ``ChatModel.complete``)."""
        event = await _call(self.remote.to_async.complete, item)
        if "status" in event:  # refused by the engine before it started
            raise _refused(int(event["status"]), str(event["error"]))
        return dict(event)

    async def generate(self, item: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        stream: Any = None
        lines: Any = None
        for attempt in range(CONNECTION_RETRIES + 1):
            stream = self.remote.to_async.generate(item)
            lines = _lines(stream)
            try:
                line = await anext(lines)
                break
            except (aiohttp.ClientError, bentoml.exceptions.BentoMLException) as err:
                await _close(lines, stream)
                if attempt == CONNECTION_RETRIES:
                    raise _unavailable(err) from err
            except StopAsyncIteration:
                await _close(lines, stream)
                raise _ended_early() from None
        try:
            while True:
                event = json.loads(line)
                if "status" in event:  # refused by the engine before it started
                    raise _refused(int(event["status"]), str(event["error"]))
                yield event
                if event.get("finished"):
                    # The chat service ends the stream right after this line: read to its end,
                    # so that BentoML's client closes the response and the pool gets the
                    # connection back (see ``_close``).
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(5):
                            async for _ in lines:
                                pass
                    return
                try:
                    line = await anext(lines)
                except StopAsyncIteration:
                    raise _ended_early() from None
        finally:
            await _close(lines, stream)


async def _lines(stream: Any) -> AsyncIterator[str]:
    """The JSON lines of a streamed answer, whatever the chunk boundaries."""
    buffer = ""
    async for piece in stream:
        buffer += piece if isinstance(piece, str) else piece.decode()
        while "\n" in buffer:
            line, buffer = buffer.split("\n", 1)
            yield line
    if buffer.strip():
        yield buffer


async def _close(*streams: Any) -> None:
    for stream in streams:
        if stream is None or not hasattr(stream, "aclose"):
            continue
        # BentoML's streaming client (``_get_stream``) iterates an inner generator that owns
        # the HTTP response; closing the outer one early leaves the inner one suspended, and
        # the connection stays checked out of the client's pool until the garbage collector
        # finds it. Under load the pool (100 connections) ran dry and requests waited minutes.
        frame = getattr(stream, "ag_frame", None)
        inner = frame.f_locals.get("resp") if frame is not None else None
        # Closing a connection that is already gone may raise: nothing left to do then.
        with contextlib.suppress(Exception):
            await stream.aclose()
        if inner is not None and hasattr(inner, "aclose"):
            with contextlib.suppress(Exception):
                await inner.aclose()


def _refused(status: int, message: str) -> ApiError:
    if status == 503:
        REJECTED.labels(reason="engine_busy").inc()
        return ApiError(
            503, message, type="server_error", code="overloaded",
            headers={"Retry-After": RETRY_AFTER_S},
        )  # fmt: skip
    return ApiError(status, message, param="messages", code="prompt_too_long")


def _ended_early() -> ApiError:
    return ApiError(
        503, "the model service ended the answer early; retry", type="server_error",
        code="model_unavailable", headers={"Retry-After": RETRY_AFTER_S},
    )  # fmt: skip


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
    sources: list[Annotated[Text, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list, max_length=50, description="corpus paths; * is a wildcard"
    )
    formats: list[Text] = Field(default_factory=list, max_length=10)
    doc_ids: list[Text] = Field(default_factory=list, max_length=100)


@bentoml.service(
    name="refinery",
    workers=service_settings().entry_workers,
    traffic={"timeout": 300},
    labels={"project": "refinery"},
    logging=LOGGING,
)
@bentoml.asgi_app(openai_app, path="/v1")
class Refinery:
    chat = bentoml.depends(ChatModel)
    if PINS is not None:
        embedding = bentoml.models.BentoModel(PINS.embedding_model_tag)
    if PINS is not None and PINS.image_model_tag:  # an image champion existed at build time
        images = bentoml.depends(ImageModel)

    def __init__(self, settings: ServingSettings | None = None) -> None:
        self.settings = settings or service_settings()
        self.pins = _pins()
        self.stores = _store_settings(self.pins)
        self.limits = self.settings.limits
        self.guard_mode = self.settings.guard  # block | off
        self._retrieval: tuple[Any, Any] | None = None
        self.gateway: Gateway | None = None
        self.load_error: str | None = None
        # The models load in the background: until they are, every API answers 503 at once
        # (the middleware), and /readyz says not ready.
        threading.Thread(target=self._start, name="load-entry", daemon=True).start()

    def _start(self) -> None:
        try:
            self._load()
        except Exception as err:
            log.exception("starting the entry service failed")
            self.load_error = f"{type(err).__name__}: {err}"

    def _load(self) -> None:
        from refinery.retrieval.embedding import Embedder
        from refinery.safety.guard import InjectionGuard
        from refinery.safety.screening.documents import document_screen
        from serving.cache import make_cache
        from serving.traces import ServedTraces
        from serving.traffic import TrafficLog

        s = self.settings
        _quiet_optional_kernels()
        embedder = Embedder(self.pins.embedding_model, location=self.embedding.path)
        tokenizer = embedder.tokenizer()
        guard = InjectionGuard(embedder.encode) if self.guard_mode == "block" else None
        chunk_screen = document_screen() if self.guard_mode == "block" else None
        self.gateway = Gateway(
            chat=ChatServiceClient(self.chat),
            encode=embedder.encode,
            count_tokens=lambda texts: [
                sum(e.attention_mask) for e in tokenizer.encode_batch(texts)
            ],
            screen=(lambda texts: [v.to_dict() for v in guard.check(texts)]) if guard else None,
            chunk_screen=chunk_screen,
            cache=make_cache(s.redis_url, ttl_s=s.cache_ttl_s),
            traffic=TrafficLog(
                self._new_engine,
                s.traffic,
                on_drop=lambda reason, n: TRAFFIC_DROPPED.labels(reason=reason).inc(n),
            ),
            limits=self.limits,
            hourly_price=s.price_per_hour,
            model_id=self.pins.registered_model,
            model_label=self.pins.model_label,
            embedding_model=self.pins.embedding_model,
            follow=bool(s.follow_alias),
            embed_batch=s.embed_max_batch,
            timeout_s=s.request_timeout_s,
            variant=self.pins.variant,
            rag_policy=RagPolicy(load_calibration(), s.rag_min_confidence),
            traces=ServedTraces(
                self.stores.mlflow_tracking_uri,
                s.traces,
                salt=s.traffic.salt,
                on_drop=lambda reason, n: TRACES_DROPPED.labels(reason=reason).inc(n),
            ),
        )
        for reason in ("queue_full", "db_error"):  # the series exist before the first drop
            TRAFFIC_DROPPED.labels(reason=reason).inc(0)
        for reason in ("queue_full", "mlflow_error"):
            TRACES_DROPPED.labels(reason=reason).inc(0)
        embedder.encode(["warm up"])
        vision_model()  # labels of image parts: loaded now, not on the first image request
        ENTRY_READY.set()
        log.info("serving %s (variant %s)", self.pins.model_label, self.pins.variant)

    def __is_ready__(self) -> bool:
        return ENTRY_READY.is_set()

    def __is_alive__(self) -> bool:
        return self.load_error is None

    @property
    def gw(self) -> Gateway:
        if self.gateway is None:  # the middleware refuses requests before this can happen
            raise ApiError(503, "the service is starting", type="server_error", code="starting",
                           headers={"Retry-After": "5"})  # fmt: skip
        return self.gateway

    # -- OpenAI-compatible API --
    @openai_app.get("/models")
    async def models(self) -> dict[str, Any]:
        await self.gw.refresh_label()
        return {
            "object": "list",
            "data": [
                {
                    "id": self.pins.registered_model,
                    "object": "model",
                    "created": 0,
                    "owned_by": "refinery",
                    "version": self.gw.model_label.rsplit("/", 1)[-1],
                    "variant": self.pins.variant,
                },
                {  # chat completions answered from the documents, as /rag answers
                    "id": RAG_MODEL,
                    "object": "model",
                    "created": 0,
                    "owned_by": "refinery",
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
        gw = self.gw
        await gw.refresh_label()
        if body.model != RAG_MODEL:
            gw.check_model(body.model)
        await resolve_images(body.messages, self.limits)  # image_url parts → their OCR text
        if body.model == RAG_MODEL:
            return await self._rag_chat(body)
        item = body.engine_item(self.limits)
        if not body.stream:
            payload, headers = await gw.chat_completion(item, t0)
            return JSONResponse(payload, headers=headers)
        await gw.screen("chat", [m["content"] for m in item["messages"] if m["role"] == "user"], t0)
        events = await gw.open_stream(item)  # refusals (busy, too long) still get their status
        answer_id = new_answer_id()
        return StreamingResponse(
            gw.chat_stream(events, item, body.stream_options or {}, t0, answer_id),
            media_type="text/event-stream",
            headers={"x-refinery-model-version": gw.model_label, ANSWER_ID_HEADER: answer_id},
        )

    async def _rag_chat(self, body: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        """``model: refinery-rag``: the last user message answered from the documents as /rag
        answers it (k=3; greedy, whatever the temperature), sources in the body. Streamed, the
        finished answer comes as one chunk: it is scored, and maybe withheld, only when whole."""
        question = rag_question(body.plain_messages(self.limits))  # the checks of any chat
        limit = body.token_limit(self.limits, RAG_DEFAULT_TOKENS)
        answer, headers = await self._rag(question, RAG_DEFAULT_K, None, limit)
        answer_id = headers.get(ANSWER_ID_HEADER)
        if body.stream:
            return StreamingResponse(
                rag_chat_stream(answer, body.stream_options or {}, answer_id),
                media_type="text/event-stream",
                headers=headers,
            )
        return JSONResponse(rag_chat_response(answer, answer_id), headers=headers)

    @openai_app.post("/embeddings")
    async def embeddings(self, body: EmbeddingRequest) -> JSONResponse:
        gw = self.gw
        if body.model and body.model not in (self.pins.embedding_model, gw.model_id):
            gw.check_model(body.model)
        t0 = time.perf_counter()
        vectors, tokens, state, cost = await gw.embeddings(body.texts(self.limits), t0)
        dim = len(unb64(vectors[0]))
        if body.dimensions is not None and body.dimensions != dim:
            raise ApiError(
                400,
                f"this model makes {dim}-dimensional vectors; "
                f"dimensions={body.dimensions} is not supported",
                param="dimensions",
            )
        data: list[Any] = vectors  # base64 float32: what the openai client asks for by default
        if body.encoding_format == "float":
            data = [unb64(v).tolist() for v in vectors]
        return JSONResponse(
            embedding_response(self.pins.embedding_model, data, tokens),
            headers=gw.headers(state, cost),
        )

    # -- images --
    @openai_app.post("/images/generations")
    async def images_generations(self, body: ImageGenerationRequest) -> JSONResponse:
        return JSONResponse(await self._generate_images(body))

    @bentoml.task(route="/images/jobs")
    async def image_job(
        self,
        prompt: Annotated[Text, Field(min_length=1, max_length=1000)],
        n: Annotated[int, Field(ge=1)] = 1,
        size: str = "256x256",
        seed: Annotated[int | None, Field(ge=0, le=2**31 - 1)] = None,
        steps: Annotated[int | None, Field(ge=1)] = None,
    ) -> dict[str, Any]:
        """The same generation as a long job: POST /images/jobs/submit answers a task id at
        once; GET /images/jobs/status and /images/jobs/get (?task_id=) poll and fetch. A
        request the service refuses completes with OpenAI's error body."""
        try:
            body = ImageGenerationRequest(prompt=prompt, n=n, size=size, seed=seed, steps=steps)
            return await self._generate_images(body)
        except ApiError as err:
            return {**err.body(), "status": err.status}

    async def _generate_images(self, body: ImageGenerationRequest) -> dict[str, Any]:
        t0 = time.perf_counter()
        label = self.pins.image_label
        if not label:
            raise ApiError(
                501, "this deployment serves no image model: none was promoted when its Bento "
                "was built (run `refinery images`, then rebuild the Bento)",
                type="server_error", code="images_unavailable",
            )  # fmt: skip
        if body.model and body.model not in (self.pins.image_model, label):
            raise ApiError(404, f"model {body.model!r} is not served here; use "
                           f"{self.pins.image_model!r}", param="model",
                           code="model_not_found")  # fmt: skip
        items = image_items(body, self.settings.images)
        await self.gw.screen("images", [body.prompt], t0)
        results = await _call(self.images.to_async.draw, items)
        return images_response(list(results), label)

    # -- RAG --
    @bentoml.api(route="/rag")
    async def rag(
        self,
        question: Annotated[Text, Field(min_length=1, max_length=RAG_MAX_QUESTION_CHARS)],
        k: Annotated[int, Field(ge=1, le=20)] = RAG_DEFAULT_K,
        filters: RagFilters | None = None,
        max_tokens: Annotated[int | None, Field(ge=1, le=4096)] = None,
        images: list[dict[str, Any]] | None = None,
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Answer a question from the corpus: the answer and its ``kind`` (the model's answer;
        below the confidence threshold a ``quote`` of the retrieved sentence that best
        supports one, or ``none``: not in the documents; ``refused``: a leak), its sources
        (document, chunk, score) and a confidence in [0, 1] (refinery/rag/answer.py).
        ``images``: OpenAI-style image_url parts with data: URLs; the text read from them
        joins the question, for retrieval and for the prompt."""
        try:
            limit = max_tokens or min(RAG_DEFAULT_TOKENS, self.limits.max_tokens)
            image_texts = await rag_image_text(images, self.limits)
            question = with_image_text(question, image_texts) if image_texts else question
            answer, headers = await self._rag(question, k, filters, limit)
            ctx.response.headers.update(headers)
            return answer
        except ApiError as err:
            ctx.response.status_code = err.status
            for name, value in err.headers.items():
                ctx.response.headers[name] = value
            return err.body()

    async def _rag(
        self, question: str, k: int, filters: RagFilters | None, max_tokens: int
    ) -> tuple[dict[str, Any], dict[str, str]]:
        from refinery.retrieval.search import Filters, search

        t0 = time.perf_counter()
        await self.gw.refresh_label()
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
        engine, space = await asyncio.to_thread(self._retrieval_state)

        def hybrid(vector: Any, k: int, flt: Any) -> list[Any]:
            try:  # full-text and vector search, fused (refinery.retrieval.search)
                return search(engine, space, vector, question, k, flt)
            except sa_errors() as err:  # the database went away: retry once it is back
                raise store_unavailable(err) from err

        flt = Filters(tuple(f.sources), tuple(f.formats), tuple(f.doc_ids))
        return await self.gw.rag(request, hybrid, flt, t0)

    def _new_engine(self) -> Any:
        """An engine on Refinery's database (REFINERY_DATABASE_URL, else the embedded one)."""
        from refinery.core.stores import make_engine

        # Queries give up after 5 s; connections after CONNECT_TIMEOUT_S.
        return make_engine(settings=self.stores, statement_timeout_s=5)

    def _retrieval_state(self) -> tuple[Any, Any]:
        """The database engine and the embedding space (once; the space must exist)."""
        if self._retrieval is None:
            from refinery.retrieval.vectorstore import VectorStore

            try:
                store = VectorStore(self._new_engine())
                space = store.find_space(self.pins.embedding_model)
            except sa_errors() as err:
                raise store_unavailable(err) from err
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


def sa_errors() -> tuple[type[Exception], ...]:
    import sqlalchemy.exc

    return (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, OSError)


def store_unavailable(err: Exception) -> ApiError:
    REJECTED.labels(reason="store_unavailable").inc()
    return ApiError(
        503,
        f"the document store is unavailable ({type(err).__name__}); retry shortly",
        type="server_error",
        code="store_unavailable",
        headers={"Retry-After": "5"},
    )


def _unavailable(err: Exception) -> ApiError:
    status = int(getattr(err, "error_code", 503))
    REJECTED.labels(reason="model_overloaded" if status == 503 else "model_unreachable").inc()
    return ApiError(
        503,
        f"the model service did not answer ({type(err).__name__}); retry shortly",
        type="server_error",
        code="overloaded" if status == 503 else "model_unavailable",
        headers={"Retry-After": RETRY_AFTER_S},
    )


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
                raise _unavailable(err) from err
        except bentoml.exceptions.BentoMLException as err:
            if int(getattr(err, "error_code", 500)) == 503:
                raise _unavailable(err) from err
            raise
    raise AssertionError("unreachable")


Refinery.add_asgi_middleware(  # type: ignore[attr-defined]
    GatewayMiddleware, settings=service_settings(), ready=ENTRY_READY.is_set
)
