"""Two small tools of the entry process: single flight and micro-batching.

- ``SingleFlight``: identical requests in flight share one computation (the first caller runs
  it; the others await its result). A burst of 32 identical prompts costs one generation.
- ``MicroBatcher``: callers submit one item each; a worker thread runs ``fn`` over whatever
  arrived together (up to ``max_batch``, waiting at most ``max_wait_s`` for more once one is
  there) and hands each caller its own result. The embedding model runs in the entry process
  this way: no hop, no copy, batches as large as the load makes them.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class SingleFlight:
    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Future[Any]] = {}
        self.shared = 0  # calls answered by another caller's computation

    async def run(self, key: Hashable | None, make: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``(result, shared)``. ``key`` None: no sharing. A failure reaches every waiter; a
        cancelled leader passes the work on (the next waiter runs it) rather than failing
        the others."""
        if key is None:
            return await make(), False
        while True:
            running = self._inflight.get(key)
            if running is None:
                break
            try:
                result = await asyncio.shield(running)
            except asyncio.CancelledError:
                if running.cancelled():
                    continue  # the leader went away: try to lead
                raise
            self.shared += 1
            return result, True
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await make()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # retrieved here: no "never retrieved" warning without waiters
            raise
        else:
            future.set_result(result)
            return result, False
        finally:
            self._inflight.pop(key, None)


class MicroBatcher(Generic[T, R]):
    """``fn(items) -> results`` (same length, same order) run in one background thread."""

    def __init__(
        self,
        fn: Callable[[Sequence[T]], Sequence[R]],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        name: str = "batcher",
    ) -> None:
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self._queue: queue.SimpleQueue[
            tuple[T, asyncio.Future[R], asyncio.AbstractEventLoop] | None
        ]
        self._queue = queue.SimpleQueue()
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.put((item, future, loop))
        return await future

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        return list(await asyncio.gather(*(self.submit(i) for i in items)))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            live = [b for b in batch if not b[1].cancelled()]
            if not live:
                continue
            try:
                results = self.fn([item for item, _, _ in live])
                outcome: list[tuple[bool, Any]] = [(True, r) for r in results]
            except Exception as err:  # noqa: BLE001 - handed to every caller of the batch
                outcome = [(False, err)] * len(live)
            self.batches += 1
            self.items += len(live)
            for (_, future, loop), (ok, value) in zip(live, outcome, strict=True):
                loop.call_soon_threadsafe(_settle, future, ok, value)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
