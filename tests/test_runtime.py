"""The engine loop thread and the bounded fan-out that batches and eval are built on."""

from __future__ import annotations

import asyncio

import pytest

from ragserve.engine.runtime import LoopThread, map_bounded
from ragserve.testing.waits import WAIT_S


async def test_map_bounded_keeps_order_and_its_limit_and_reports_failures_in_their_slot() -> None:
    running = peak = 0
    done: list[int] = []

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (10 - i))  # later items finish first
        running -= 1
        if i == 3:
            raise ValueError("item 3")
        return i * i

    results = await map_bounded(work, range(10), 4, on_done=lambda: done.append(1))
    assert peak == 4
    assert len(done) == 10
    assert isinstance(results[3], ValueError) and str(results[3]) == "item 3"
    assert [r for i, r in enumerate(results) if i != 3] == [i * i for i in range(10) if i != 3]


async def test_map_bounded_starts_the_next_item_as_soon_as_one_finishes() -> None:
    item_2_started = asyncio.Event()

    async def work(i: int) -> None:
        if i == 0:
            await asyncio.sleep(0.01)
        elif i == 1:  # ends only once item 2 runs, whatever the machine's speed
            await asyncio.wait_for(item_2_started.wait(), WAIT_S)
        else:
            item_2_started.set()

    results = await map_bounded(work, range(3), 2)
    # Item 2 takes item 0's slot when it ends, not the slower item 1's (which would wait for ever).
    assert not [r for r in results if isinstance(r, BaseException)], results


async def test_map_bounded_reraises_cancellation() -> None:
    async def work(i: int) -> None:
        if i == 1:
            raise asyncio.CancelledError
        await asyncio.sleep(0)

    with pytest.raises(asyncio.CancelledError):
        await map_bounded(work, range(3), 3)


def test_iterate_relays_items_then_the_producers_error() -> None:
    rt = LoopThread(name="test-loop")

    async def produce():  # type: ignore[no-untyped-def]
        yield 1
        yield 2
        raise KeyError("boom")

    got = []
    try:
        with pytest.raises(KeyError, match="boom"):
            for x in rt.iterate(produce()):
                got.append(x)
        assert got == [1, 2]
    finally:
        rt.stop()


async def test_aiterate_relays_items_across_loops_and_ends() -> None:
    rt = LoopThread(name="test-loop")

    async def produce():  # type: ignore[no-untyped-def]
        for i in range(3):
            await asyncio.sleep(0)
            yield i

    try:
        assert [x async for x in rt.aiterate(produce())] == [0, 1, 2]
    finally:
        rt.stop()


def test_a_caller_loop_that_ended_leaves_no_mailbox_behind() -> None:
    import gc

    rt = LoopThread(name="test-loop")

    async def produce():  # type: ignore[no-untyped-def]
        yield 1

    async def read() -> list[int]:
        return [x async for x in rt.aiterate(produce())]

    try:
        for _ in range(5):  # a library user's asyncio.run per call: a new loop each time
            assert asyncio.run(read()) == [1]
        gc.collect()
        assert len(rt._mailboxes) == 0
    finally:
        rt.stop()
