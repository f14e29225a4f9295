"""The engine's shared layer (detokenization, stop strings, limits, cancellation, the queue)
on a scripted backend. The real backends are in tests/integration."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from refinery.generation.engine.base import (
    Delta,
    Engine,
    EngineBusy,
    EngineClosed,
    EngineStats,
    PromptTooLong,
    SamplingParams,
    Speculation,
)


class WordTokenizer:
    """Token i is word i of a fixed vocabulary; 0 is the end of a turn."""

    vocab = ("<|im_end|>", "Bees", " make", " honey", " and", " wax", ".", " STOP", " é")
    eos_token_id = 0
    unk_token_id = None

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return " ".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1] * len(text.split())}

    def convert_tokens_to_ids(self, token):
        return 0 if token == "<|im_end|>" else None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 0))


class ScriptedBackend:
    """Emits a fixed script of token ids, one per tick of a background thread."""

    name = "scripted"
    max_context = 64
    speculation = Speculation.none

    def __init__(self, script: list[int], tick_s: float = 0.002) -> None:
        self.script, self.tick_s = script, tick_s
        self.active: dict[str, int] = {}
        self.cancelled: list[str] = []
        self.waiting = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def start(self, sink) -> None:
        self.sink = sink
        threading.Thread(target=self.run, daemon=True).start()

    def add(self, rid, prompt_ids, params) -> None:
        with self.lock:
            self.active[rid] = 0
            self.limit = params.max_tokens

    def cancel(self, rid) -> None:
        with self.lock:
            if self.active.pop(rid, None) is not None:
                self.cancelled.append(rid)

    def stats(self) -> EngineStats:
        return EngineStats(waiting=self.waiting, running=len(self.active))

    def close(self) -> None:
        self.stop.set()

    def run(self) -> None:
        while not self.stop.wait(self.tick_s):
            with self.lock:
                items = list(self.active.items())
            for rid, pos in items:
                token = self.script[pos]
                done = token == 0 or pos + 1 >= len(self.script)
                with self.lock:
                    if rid not in self.active:
                        continue
                    if done:
                        self.active.pop(rid)
                    else:
                        self.active[rid] = pos + 1
                self.sink(rid, [token], done, "stop" if token == 0 else "length" if done else None)


SCRIPT = [1, 2, 3, 4, 5, 6, 0]  # "Bees make honey and wax." then end of turn


def collect(engine: Engine, params: SamplingParams, prompt: str = "Tell me") -> list[Delta]:
    async def run():
        return [d async for d in engine.stream(prompt, params)]

    return asyncio.run(run())


def test_stream_hands_out_text_as_it_comes_and_ends_with_usage():
    engine = Engine(ScriptedBackend(SCRIPT), WordTokenizer())
    deltas = collect(engine, SamplingParams(max_tokens=32))
    assert "".join(d.text for d in deltas) == "Bees make honey and wax."
    assert len(deltas) >= 5  # piece by piece, not one blob
    last = deltas[-1]
    assert last.finished and last.finish_reason == "stop"
    assert (last.prompt_tokens, last.completion_tokens) == (2, 6)  # the end of turn is not counted


def test_max_tokens_and_stop_strings_are_honoured():
    engine = Engine(ScriptedBackend(SCRIPT), WordTokenizer())
    short = collect(engine, SamplingParams(max_tokens=3))
    assert "".join(d.text for d in short) == "Bees make honey"
    assert short[-1].finish_reason == "length" and short[-1].completion_tokens == 3
    stopped = collect(engine, SamplingParams(max_tokens=32, stop=(" and",)))
    assert "".join(d.text for d in stopped) == "Bees make honey"  # nothing of the stop string
    assert stopped[-1].finish_reason == "stop"
    assert not any(" an" in d.text for d in stopped)  # held back until it could be ruled out
    assert engine.backend.cancelled  # the engine stopped the backend's request


def test_leaving_early_cancels_the_request_in_the_backend():
    backend = ScriptedBackend(SCRIPT * 20, tick_s=0.01)
    engine = Engine(backend, WordTokenizer())

    async def run():
        # The server closes the stream of a client that went away, as aclosing does here.
        async with contextlib.aclosing(
            engine.stream("Tell me", SamplingParams(max_tokens=50))
        ) as stream:
            async for _ in stream:
                break  # the client went away
        # Closed: the request left the engine and the backend before anything else runs.
        assert len(backend.cancelled) == 1 and not backend.active and engine.cancelled == 1

    asyncio.run(run())


def test_full_queue_and_long_prompts_are_refused_before_anything_runs():
    backend = ScriptedBackend(SCRIPT)
    engine = Engine(backend, WordTokenizer(), max_waiting=2)
    backend.waiting = 2
    with pytest.raises(EngineBusy):
        engine.submit("Tell me", SamplingParams(max_tokens=8), lambda d: None)
    backend.waiting = 0
    with pytest.raises(PromptTooLong, match="context of 64 tokens"):
        engine.submit("word " * 40, SamplingParams(max_tokens=30), lambda d: None)
    with pytest.raises(ValueError):
        engine.submit("Tell me", SamplingParams(max_tokens=0), lambda d: None)
    assert not backend.active


def test_an_engine_closes_only_when_idle_and_then_refuses_requests():
    """A swapped-out engine is retired with close_if_idle, atomic with submit: a request that
    read the old engine just before the swap is counted (the engine stays open for it) or is
    refused with EngineClosed (and goes to the new engine), never left on a closed backend."""
    backend = ScriptedBackend(SCRIPT * 20, tick_s=0.01)
    engine = Engine(backend, WordTokenizer())
    rid = engine.submit("Tell me", SamplingParams(max_tokens=50), lambda d: None)
    assert not engine.close_if_idle() and not backend.stop.is_set()
    engine.cancel(rid)
    assert engine.close_if_idle() and backend.stop.is_set()
    with pytest.raises(EngineClosed):
        engine.submit("Tell me", SamplingParams(max_tokens=4), lambda d: None)

    # Many threads submitting while another retires the engine: every request either ends or
    # was refused; none is accepted after the close.
    backend = ScriptedBackend(SCRIPT, tick_s=0.001)
    engine = Engine(backend, WordTokenizer())
    finished = threading.Condition()  # notified whenever a request ends
    submitted = threading.Event()  # requests are in flight: time to try retiring the engine

    def ended(delta: Delta, done: threading.Event) -> None:
        if delta.finished:
            done.set()
            with finished:
                finished.notify_all()

    def client() -> list[str]:
        outcomes: list[str] = []
        for _ in range(50):
            done = threading.Event()
            try:
                engine.submit("Tell me", SamplingParams(max_tokens=8),
                              lambda d, done=done: ended(d, done))  # fmt: skip
            except EngineClosed:
                outcomes.append("refused")
                return outcomes
            submitted.set()
            outcomes.append("answered" if done.wait(30) else "lost")
        return outcomes

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client) for _ in range(4)]
        assert submitted.wait(30)
        with finished:  # retire it at a moment with nothing in flight (checked at each end)
            assert finished.wait_for(engine.close_if_idle, timeout=60), "never idle"
        outcomes = [f.result(timeout=60) for f in futures]  # a client that died raises here
    assert backend.stop.is_set() and len(outcomes) == 4
    for mine in outcomes:  # every request was answered, until the engine refused one
        answered = mine[:-1] if mine[-1:] == ["refused"] else mine
        assert answered == ["answered"] * len(answered), mine
        assert len(mine) == 50 or mine[-1] == "refused", mine


def test_generate_answers_many_prompts_through_the_batch():
    engine = Engine(ScriptedBackend(SCRIPT), WordTokenizer())
    outs = engine.generate(["a", "b c", "d"], max_new_tokens=[2, 32, 4])
    assert [o.text for o in outs] == [
        "Bees make",
        "Bees make honey and wax.",
        "Bees make honey and",
    ]
    assert [o.finish_reason for o in outs] == ["length", "stop", "length"]


def test_an_answer_that_loops_ends_after_the_loops_first_cycle():
    # "Bees make honey and" then " honey and" over and over: cut after the first " honey and".
    loop = [1, 2, 3, 4] + [3, 4] * 20
    backend = ScriptedBackend(loop)
    engine = Engine(backend, WordTokenizer())
    (done,) = engine.generate(["Tell me"], max_new_tokens=40)
    assert done.text == "Bees make honey and" and done.finish_reason == "stop"
    assert done.completion_tokens < 20  # stopped as the loop was seen, not at the limit
    assert backend.cancelled
    streamed = collect(engine, SamplingParams(max_tokens=40))
    assert streamed[-1].whole == "Bees make honey and"  # what a non-streaming caller gets
    off = collect(engine, SamplingParams(max_tokens=30, stop_loops=False))
    assert off[-1].finish_reason == "length" and off[-1].completion_tokens == 30


def test_the_loop_cut_is_the_same_whether_tokens_come_one_or_many_at_a_time():
    from refinery.generation.generator import first_loop_cut, loop_cut

    ids = [7, 8, 9] + [1, 2, 3, 4] * 6 + [5, 6]  # the model leaves the loop later
    one_by_one = next(c for n in range(1, len(ids) + 1) if (c := loop_cut(ids, n)) is not None)
    assert one_by_one == 7  # after the loop's first cycle
    assert first_loop_cut(ids) == one_by_one
    assert first_loop_cut(ids, since=10) == one_by_one  # a burst of tokens after the 10th
    assert loop_cut(ids) is None  # the whole list does not end in a loop
    assert first_loop_cut([1, 2, 3, 1, 2, 3, 4, 5, 1, 2, 3, 4]) is None  # repeats, no loop
    assert first_loop_cut([5] * 11) is None and first_loop_cut([5] * 12) == 1


def test_batch_generation_keeps_a_looping_answer_to_its_first_cycle():
    from refinery.generation.generator import _ChatLM

    lm = object.__new__(_ChatLM)  # the shared completion logic, without a model
    lm.tokenizer, lm.eos_ids = WordTokenizer(), [0]
    looped = lm._completion([1, 2, 3, 4] + [3, 4] * 10, 5, 0.1, [-0.5] * 24)
    assert looped.text == "Bees make honey and" and looped.finish_reason == "stop"
    assert looped.completion_tokens == 4 and looped.token_logprobs == [-0.5] * 4
    plain = lm._completion(SCRIPT, 5, 0.1)
    assert plain.text == "Bees make honey and wax." and plain.completion_tokens == 6
