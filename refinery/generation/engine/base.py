"""One engine interface for generation: submit a request, get its text as it comes, cancel it.

A *backend* runs the model with continuous batching and deals in token ids only: it is told
to ``add`` a request (prompt ids, sampling settings) and reports, from its own thread, the new
ids of each request as they come and when a request ended. ``Engine`` is the same for every
backend: chat templating, incremental detokenization (whole characters only), stop strings,
the loop stop (``refinery.generation.generator.loop_cut``), ``max_tokens``, cancellation, a
bounded queue, per-request results on the caller's event loop, and the statistics the service
exports.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from refinery.generation.generator import first_loop_cut

Message = dict[str, str]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End of sequence and the chat templates' end-of-turn tokens."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


class Speculation(enum.StrEnum):
    none = "none"
    prompt_lookup = "prompt_lookup"  # drafts copied from the prompt (RAG answers quote chunks)
    draft_model = "draft_model"  # a smaller model with the same tokenizer proposes tokens


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    speculation: Speculation | None = None  # None: the engine's default
    stop_loops: bool = True  # end an answer that repeats itself (generator.loop_cut)


class EngineBusy(RuntimeError):
    """The engine's queue is full: the caller should answer 503 with Retry-After."""


class EngineClosed(RuntimeError):
    """The engine was retired (a newer model took its place) before the request reached it:
    the caller should submit to the engine now in place."""


class PromptTooLong(ValueError):
    """The prompt (plus max_tokens) does not fit the model's context."""


@dataclass
class Delta:
    """What one request produced since the last delta."""

    text: str
    finished: bool = False
    finish_reason: str | None = None  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    compute_s: float = 0.0  # this request's share of the engine's time so far
    # On the last delta, where the answer is not the pieces joined: a loop stop keeps the text
    # up to the loop's first cycle, and pieces of the later cycles may have been streamed.
    whole: str | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    seconds: float  # this request's share of the engine's time (what its cost is made of)


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    requests: int = 0
    generated_tokens: int = 0
    steps: int = 0
    batch_tokens: int = 0  # sum over steps of the sequences in the batch
    draft_proposed: int = 0
    draft_accepted: int = 0

    @property
    def mean_batch(self) -> float:
        return self.batch_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0


# (request id, new token ids, finished, finish reason or error text)
Sink = Callable[[str, Sequence[int], bool, str | None], None]


class Backend(Protocol):
    """What a model runtime provides to the engine."""

    name: str
    max_context: int
    speculation: Speculation  # what it does when a request does not say

    def start(self, sink: Sink) -> None: ...
    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None: ...
    def cancel(self, rid: str) -> None: ...
    def stats(self) -> EngineStats: ...
    def close(self) -> None: ...


@dataclass
class _Request:
    rid: str
    prompt_tokens: int
    params: SamplingParams
    loop: asyncio.AbstractEventLoop | None
    on_delta: Callable[[Delta], None]
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters already handed out
    done: bool = False
    last_t: float = field(default_factory=time.perf_counter)
    compute_s: float = 0.0


class Engine:
    """Chat requests in, text deltas out, over any backend. Thread-safe; ``stream`` and
    ``complete`` are for an event loop, ``generate`` for plain code (evaluation, benchmarks)."""

    def __init__(self, backend: Backend, tokenizer: Any, *, max_waiting: int = 256) -> None:
        self.backend, self.tokenizer, self.max_waiting = backend, tokenizer, max_waiting
        self.eos_ids = set(stop_token_ids(tokenizer))
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._closed = False
        self.cancelled = 0
        backend.start(self._on_tokens)

    # -- prompts --
    def chat_text(self, messages: Sequence[Message] | str) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return str(
            self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        )

    def prompt_ids(self, messages: Sequence[Message] | str) -> list[int]:
        return list(self.tokenizer(self.chat_text(messages), add_special_tokens=False)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- requests --
    def submit(
        self,
        messages: Sequence[Message] | str,
        params: SamplingParams,
        on_delta: Callable[[Delta], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> str:
        """Start a request; ``on_delta`` is called (on ``loop`` when given, else in the
        backend's thread) with each piece of text and once more when it ends."""
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        ids = self.prompt_ids(messages)
        if len(ids) + params.max_tokens > self.backend.max_context:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens; with max_tokens {params.max_tokens} it "
                f"exceeds the model's context of {self.backend.max_context} tokens"
            )
        rid = f"r{next(self._ids)}"
        with self._lock:
            if self._closed:
                raise EngineClosed("this engine was retired; submit to the one in its place")
            if self.backend.stats().waiting >= self.max_waiting:
                raise EngineBusy(f"{self.max_waiting} requests are waiting for the model")
            self._requests[rid] = _Request(rid, len(ids), params, loop, on_delta)
        self.backend.add(rid, ids, params)
        return rid

    def cancel(self, rid: str) -> None:
        with self._lock:
            req = self._requests.pop(rid, None)
        if req is not None and not req.done:
            req.done = True
            self.cancelled += 1
            self.backend.cancel(rid)

    async def stream(
        self, messages: Sequence[Message] | str, params: SamplingParams
    ) -> AsyncIterator[Delta]:
        """Deltas as they come; leaving the loop early (a client that went away) cancels the
        request, so it stops using the engine."""
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        rid = self.submit(messages, params, queue.put_nowait, asyncio.get_running_loop())
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finished:
                    return
        finally:
            self.cancel(rid)  # a no-op when it finished

    async def complete(
        self, messages: Sequence[Message] | str, params: SamplingParams
    ) -> Completion:
        pieces: list[str] = []
        last = Delta("")
        async for delta in self.stream(messages, params):
            pieces.append(delta.text)
            last = delta
        if last.finish_reason == "error":
            raise RuntimeError(last.error or "generation failed")
        return Completion(
            ("".join(pieces) if last.whole is None else last.whole).strip(),
            last.prompt_tokens,
            last.completion_tokens,
            last.finish_reason or "stop",
            last.compute_s,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[Message] | str],
        max_new_tokens: int | Sequence[int] = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Completion]:
        """All prompts at once, through the running batch; blocks until every one ends."""
        limits = (
            [max_new_tokens] * len(prompts)
            if isinstance(max_new_tokens, int)
            else list(max_new_tokens)
        )

        async def run() -> list[Completion]:
            return list(
                await asyncio.gather(
                    *(
                        self.complete(p, SamplingParams(m, temperature, top_p, seed))
                        for p, m in zip(prompts, limits, strict=True)
                    )
                )
            )

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(run())
        # Called from code that runs an event loop in this thread (a service's start-up):
        # run ours in another thread.
        out: list[list[Completion]] = []
        worker = threading.Thread(target=lambda: out.append(asyncio.run(run())))
        worker.start()
        worker.join()
        return out[0]

    def stats(self) -> EngineStats:
        return self.backend.stats()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.backend.close()

    def close_if_idle(self) -> bool:
        """Close the engine if no request is in it; atomic with ``submit`` (same lock), so a
        request either is counted here or is refused with ``EngineClosed``, never left waiting
        on a closed backend. True when it closed."""
        with self._lock:
            s = self.backend.stats()
            if self._requests or s.running or s.waiting:
                return False
            self._closed = True
        self.backend.close()
        return True

    # -- from the backend's thread --
    def _on_tokens(
        self, rid: str, new_ids: Sequence[int], finished: bool, reason: str | None
    ) -> None:
        with self._lock:
            req = self._requests.get(rid)
            sharing = max(1, len(self._requests))
        if req is None or req.done:
            return
        # Cost accounting: the engine's time since this request's last tokens, shared among
        # the requests in flight (a batch of 8 that took 80 ms costs each one 10 ms).
        now = time.perf_counter()
        req.compute_s += (now - req.last_t) / sharing
        req.last_t = now
        before = len(req.ids)
        req.ids.extend(i for i in new_ids if i not in self.eos_ids)
        params = req.params
        cut = first_loop_cut(req.ids, before) if params.stop_loops else None
        text = self._decode(req.ids if cut is None else req.ids[:cut])
        end, finish = len(text), "stop" if cut is not None else None
        if params.stop:
            hits = [i for s in params.stop if (i := text.find(s)) >= 0]
            if hits:
                end, finish = min(hits), "stop"
        error = None
        if finish is None and finished:
            finish = reason or "stop"
            if finish.startswith("error"):
                finish, error = "error", reason
        if finish is None and len(req.ids) >= params.max_tokens:
            finish = "length"
        if finish is None:
            # Hold back what could still turn out to be the start of a stop string, and a
            # character still being formed by the next token.
            hold = max((len(s) - 1 for s in params.stop), default=0)
            end = len(text) - hold
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
        piece = text[req.sent : max(req.sent, end)]
        req.sent = max(req.sent, end)
        delta = Delta(
            piece,
            prompt_tokens=req.prompt_tokens,
            completion_tokens=len(req.ids),
            compute_s=req.compute_s,
        )
        if finish is not None:
            req.done = True
            delta.finished, delta.finish_reason, delta.error = True, finish, error
            if req.sent > end:  # the loop stop cut into text already sent
                delta.whole = text[:end]
            with self._lock:
                self._requests.pop(rid, None)
            if not finished:  # we ended it (stop string, max_tokens): the backend may stop too
                self.backend.cancel(rid)
        elif not piece:
            return
        if req.loop is not None:
            req.loop.call_soon_threadsafe(req.on_delta, delta)
        else:
            req.on_delta(delta)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))
