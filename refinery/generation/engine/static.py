"""Backend: fixed padded batches (what the service did before the engine). Requests that wait
together run as one left-padded ``generate`` and the batch ends when its longest row ends; a
request's tokens arrive all at once. It runs every variant (torch int8, bitsandbytes, ONNX),
and it is the baseline the serving benchmark compares the engine with (``REFINERY_ENGINE=static``).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from refinery.generation.engine.base import EngineStats, SamplingParams, Sink, Speculation


class StaticBackend:
    name = "static-batches"
    speculation = Speculation.none

    def __init__(self, generator: Any, *, max_batch: int = 16, max_context: int = 2048) -> None:
        self.generator, self.max_batch, self.max_context = generator, max_batch, max_context
        self._queue: queue.SimpleQueue[tuple[str, list[int], SamplingParams] | None]
        self._queue = queue.SimpleQueue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stats = EngineStats()
        self._running = 0
        self._sink: Sink | None = None
        self._thread = threading.Thread(target=self._run, name="static-batches", daemon=True)

    def start(self, sink: Sink) -> None:
        self._sink = sink
        self._thread.start()

    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        with self._lock:
            self._stats.requests += 1
        self._queue.put((rid, prompt_ids, params))

    def cancel(self, rid: str) -> None:
        with self._lock:
            self._cancelled.add(rid)

    def stats(self) -> EngineStats:
        with self._lock:
            s = EngineStats(**vars(self._stats))
            s.running = self._running
        s.waiting = self._queue.qsize()
        return s

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        assert self._sink is not None
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            with self._lock:
                batch = [b for b in batch if b[0] not in self._cancelled]
                self._cancelled -= {b[0] for b in batch}
                self._running = len(batch)
            groups: dict[tuple[float, float], list[tuple[str, list[int], SamplingParams]]] = {}
            for item in batch:
                groups.setdefault((item[2].temperature, item[2].top_p), []).append(item)
            for (temperature, top_p), items in groups.items():
                try:
                    outs = self.generator.generate_ids(
                        [ids for _, ids, _ in items],
                        [p.max_tokens for _, _, p in items],
                        temperature,
                        top_p,
                    )
                except Exception as err:  # noqa: BLE001 - reported to each request of the batch
                    for rid, _, _ in items:
                        self._sink(rid, [], True, f"error: {err}")
                    continue
                with self._lock:
                    self._stats.steps += max(len(o) for o in outs)
                    self._stats.batch_tokens += sum(len(o) for o in outs)
                    self._stats.generated_tokens += sum(len(o) for o in outs)
                for (rid, _, _), ids in zip(items, outs, strict=True):
                    eos = next((j for j, t in enumerate(ids) if t in self.generator.eos_ids), None)
                    kept = ids if eos is None else ids[: eos + 1]
                    reason = "stop" if eos is not None else "length"
                    self._sink(rid, kept, True, reason)
            with self._lock:
                self._running = 0
