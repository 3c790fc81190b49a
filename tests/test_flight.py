"""Single-flight over event streams (``flight.py``): one run per key, replayed to all."""

import asyncio
import itertools
from contextlib import aclosing

import pytest

from ragserve.engine.flight import StreamFlight
from ragserve.testing.waits import aeventually


async def collect(stream):
    return [event async for event in stream]


def counting(runs, events=("a", "b", "c"), delay=0.01, fail=None, gate=None):
    """A producer of ``events``, ``delay`` apart; with ``gate`` (an asyncio.Event), the events
    after the first wait for it: the test decides when the run goes on, not a timer."""
    async def produce():
        runs.append(1)
        for i, e in enumerate(events):
            await asyncio.sleep(delay)
            if gate is not None and i > 0:
                await gate.wait()
            if e == fail:
                raise ValueError(f"failed at {e}")
            yield e
    return produce


async def test_concurrent_subscribers_share_one_run_and_each_sees_every_event():
    flight, runs = StreamFlight(), []
    out = await asyncio.gather(*(collect(flight.subscribe("k", counting(runs))) for _ in range(32)))
    assert len(runs) == 1 and out == [["a", "b", "c"]] * 32
    assert (flight.runs, flight.shared, len(flight)) == (1, 31, 0)


async def test_a_late_subscriber_is_replayed_the_events_it_missed():
    flight, runs, gate, seen = StreamFlight(), [], asyncio.Event(), []

    async def watch(stream):
        async for e in stream:
            seen.append(e)
        return seen

    first = asyncio.ensure_future(watch(flight.subscribe("k", counting(runs, gate=gate))))
    await aeventually(lambda: seen == ["a"], what='"a" to be out')  # and "b" is not: the gate holds it
    late = flight.subscribe("k", counting(runs))
    assert await anext(late) == "a"  # replayed: it was out before this subscriber came
    gate.set()
    assert ["a"] + await collect(late) == ["a", "b", "c"]
    assert await first == ["a", "b", "c"] and len(runs) == 1


async def test_a_failure_reaches_every_subscriber_and_the_next_request_starts_afresh():
    flight, runs = StreamFlight(), []
    out = await asyncio.gather(*(collect(flight.subscribe("k", counting(runs, fail="b"))) for _ in range(4)),
                               return_exceptions=True)
    assert all(isinstance(e, ValueError) for e in out) and len(runs) == 1
    assert await collect(flight.subscribe("k", counting(runs))) == ["a", "b", "c"] and len(runs) == 2


async def test_a_cancelled_leader_leaves_the_run_going_for_its_followers():
    flight, runs, gate = StreamFlight(), [], asyncio.Event()  # the run cannot end before the gate opens
    leader = asyncio.ensure_future(collect(flight.subscribe("k", counting(runs, delay=0.02, gate=gate))))
    await aeventually(lambda: len(runs) == 1, what="the leader's run to start")
    follower = flight.subscribe("k", counting(runs))
    assert await anext(follower) == "a"  # the follower has joined the run
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    gate.set()
    assert ["a"] + await collect(follower) == ["a", "b", "c"] and len(runs) == 1


async def test_the_run_is_cancelled_when_its_last_subscriber_leaves():
    flight, cleaned = StreamFlight(), []

    async def produce():
        try:
            for i in itertools.count():  # endless: it ends only by being cancelled
                await asyncio.sleep(0.01)
                yield i
        finally:
            cleaned.append(True)  # where vLLM would abort the request

    async def take_two():
        async with aclosing(flight.subscribe("k", produce)) as events:
            async for e in events:
                if e == 1:
                    return e

    assert await asyncio.gather(take_two(), take_two()) == [1, 1]
    await aeventually(lambda: cleaned, what="the abandoned run to be cancelled")
    assert cleaned == [True] and len(flight) == 0


async def test_a_request_arriving_while_an_abandoned_run_is_cancelled_starts_its_own():
    flight, runs = StreamFlight(), []
    gate = asyncio.Event()  # never opened: the first run cannot end by itself before it is abandoned
    first = asyncio.ensure_future(collect(flight.subscribe("k", counting(runs, delay=0.02, gate=gate))))
    await aeventually(lambda: len(runs) == 1, what="the first run to start")
    first.cancel()
    await asyncio.sleep(0)  # the subscriber has left; the run's cancellation is pending
    assert await collect(flight.subscribe("k", counting(runs))) == ["a", "b", "c"]
    assert len(runs) == 2
