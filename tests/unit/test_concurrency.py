"""Single flight and the micro-batcher of the entry process."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.concurrency import MicroBatcher, SingleFlight


async def after_started(action) -> None:
    """Run ``action`` once every task created before this call has taken its first step: the
    loop starts ready tasks in the order they were created, so a task created now runs after
    them (``submit`` queues its item and ``SingleFlight.run`` leads or joins in that step)."""

    async def act() -> None:
        action()

    await asyncio.create_task(act())


def test_identical_requests_in_flight_share_one_computation():
    calls = 0

    async def main():
        flight = SingleFlight()
        gate = asyncio.Event()

        async def work():
            nonlocal calls
            calls += 1
            await gate.wait()
            return "answer"

        tasks = [asyncio.create_task(flight.run("k", work)) for _ in range(8)]
        other = asyncio.create_task(flight.run("other", work))
        await after_started(gate.set)  # every caller has led or joined its flight
        results = await asyncio.gather(*tasks, other)
        return results, flight

    results, flight = asyncio.run(main())
    assert calls == 2  # one per distinct key
    assert [r for r, _ in results] == ["answer"] * 9
    assert sum(shared for _, shared in results) == 7 == flight.shared
    assert not flight._inflight  # nothing left behind


def test_a_failure_reaches_every_waiter_and_a_cancelled_leader_hands_over():
    async def main():
        flight = SingleFlight()

        async def boom():
            await asyncio.sleep(0.01)
            raise ValueError("model failed")

        outcomes = await asyncio.gather(
            *(flight.run("k", boom) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(o, ValueError) for o in outcomes)

        started = asyncio.Event()
        runs = 0

        async def slow():
            nonlocal runs
            runs += 1
            started.set()
            await asyncio.sleep(0.05)
            return runs

        leader = asyncio.create_task(flight.run("j", slow))
        await started.wait()
        follower = asyncio.create_task(flight.run("j", slow))
        await after_started(leader.cancel)  # the client that started the generation went away
        result, shared = await follower
        assert (result, shared) == (2, False)  # the follower ran it itself, and got an answer
        assert (await flight.run(None, slow))[1] is False  # no key: never shared

    asyncio.run(main())


def test_micro_batcher_batches_concurrent_items_and_keeps_order():
    seen_batches: list[int] = []
    working = threading.Event()  # the worker is inside fn
    release = threading.Event()

    def fn(items):
        working.set()
        assert release.wait(30), "never released"
        seen_batches.append(len(items))
        return [i * 10 for i in items]

    batcher = MicroBatcher(fn, max_batch=8, max_wait_s=0.005)

    async def main():
        first = asyncio.create_task(batcher.submit(0))
        assert await asyncio.to_thread(working.wait, 30)  # item 0 alone occupies the worker
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 20)]
        await after_started(release.set)  # all 19 are queued while the worker is busy
        return [await first, *(await asyncio.gather(*rest))]

    try:
        assert asyncio.run(main()) == [i * 10 for i in range(20)]
    finally:
        batcher.close()
    assert seen_batches[0] == 1 and max(seen_batches[1:]) == 8 and sum(seen_batches) == 20
    assert batcher.batches == len(seen_batches) and batcher.items == 20


def test_micro_batcher_hands_an_error_to_each_caller_and_keeps_working():
    def fn(items):
        if "bad" in items:
            raise RuntimeError("encode failed")
        return [len(i) for i in items]

    batcher = MicroBatcher(fn, max_batch=4, max_wait_s=0.01)

    async def main():
        with pytest.raises(RuntimeError, match="encode failed"):
            await batcher.submit("bad")
        return await batcher.submit_many(["a", "bb", "ccc"])

    try:
        assert asyncio.run(main()) == [1, 2, 3]
    finally:
        batcher.close()
