"""Priority classes: ragserve's admission queue orders waiting runs by (priority, arrival);
the request's priority reaches the generator with ``generate.scheduling = "priority"``; a
single-flight follower with a lower number raises the run it joins; bad values are typed
400s before any work."""

import asyncio

import pytest

from ragserve.engine.admission import Admission, Ticket
from ragserve.errors import InvalidParameterError
from ragserve.testing.fakes import FakeGenerator, fake_rag
from ragserve.testing.waits import aeventually

# -- the queue -------------------------------------------------------------------------------


async def test_a_priority_0_waiter_overtakes_30_queued_priority_10_waiters():
    adm = Admission(max_in_flight=1, max_queued=64)
    order, release = [], asyncio.Event()

    async def run(name, priority):
        async with adm.slot(Ticket(priority)):
            order.append(name)
            await release.wait()

    tasks = [asyncio.ensure_future(run("blocker", 10))]
    await aeventually(lambda: adm.in_flight == 1)
    tasks += [asyncio.ensure_future(run(f"batch-{i}", 10)) for i in range(30)]
    await aeventually(lambda: adm.queued == 30)
    tasks.append(asyncio.ensure_future(run("urgent", 0)))
    await aeventually(lambda: adm.queued == 31)
    release.set()
    await asyncio.gather(*tasks)
    assert order[:2] == ["blocker", "urgent"]
    assert order[2:] == [f"batch-{i}" for i in range(30)]  # arrival order within a class
    assert (adm.in_flight, adm.queued) == (0, 0)


async def test_a_promoted_waiter_moves_up_and_a_cancelled_one_leaves_no_trace():
    adm = Admission(max_in_flight=1, max_queued=8)
    order, release = [], asyncio.Event()
    tickets = {name: Ticket(10) for name in ("a", "b", "c", "d")}

    async def run(name):
        async with adm.slot(tickets[name]):
            order.append(name)
            await release.wait()

    blocker = asyncio.ensure_future(run("a"))
    await aeventually(lambda: adm.in_flight == 1)
    waiting = {n: asyncio.ensure_future(run(n)) for n in ("b", "c", "d")}
    await aeventually(lambda: adm.queued == 3)
    assert adm.promote(tickets["d"], 5) and not adm.promote(tickets["d"], 7)  # never lowered
    assert adm.promote(tickets["c"], 1)
    waiting["c"].cancel()  # promoted, then gone: its old and new places are both skipped
    await aeventually(lambda: adm.queued == 2)
    release.set()
    await asyncio.gather(blocker, *waiting.values(), return_exceptions=True)
    assert order == ["a", "d", "b"] and (adm.in_flight, adm.queued) == (0, 0)
    assert adm.as_dict()["promoted"] == 2


async def test_a_reserved_slot_is_left_free_by_a_flood_and_taken_at_once_by_an_urgent_run():
    adm = Admission(max_in_flight=3, max_queued=64, reserved=1, urgent_priority=0)
    started, release = [], {}

    async def run(name, priority):
        release[name] = asyncio.Event()
        async with adm.slot(Ticket(priority)):
            started.append(name)
            await release[name].wait()

    flood = [asyncio.ensure_future(run(f"batch-{i}", 10)) for i in range(6)]
    await aeventually(lambda: adm.queued == 4)
    assert started == ["batch-0", "batch-1"] and adm.in_flight == 2  # the third slot is kept
    urgent = asyncio.ensure_future(run("urgent", 0))
    await aeventually(lambda: "urgent" in started)  # no wait for a batch run to end
    assert adm.in_flight == 3 and adm.queued == 4
    release["urgent"].set()
    await urgent
    assert adm.in_flight == 2 and adm.queued == 4  # the kept slot is free again, not given to the flood
    release["batch-0"].set()
    await aeventually(lambda: "batch-2" in started)  # a batch slot passes to the next batch run
    assert adm.in_flight == 2 and adm.queued == 3
    for e in release.values():  # every run has made its event by now: it is made before the slot
        e.set()
    await asyncio.gather(*flood)
    assert started == ["batch-0", "batch-1", "urgent"] + [f"batch-{i}" for i in range(2, 6)]
    assert (adm.in_flight, adm.queued) == (0, 0)


async def test_a_waiter_promoted_to_urgent_takes_a_free_reserved_slot():
    adm = Admission(max_in_flight=2, max_queued=8, reserved=1)
    release, ticket = asyncio.Event(), Ticket(10)

    async def run(t):
        async with adm.slot(t):
            await release.wait()

    first = asyncio.ensure_future(run(Ticket(10)))
    waiter = asyncio.ensure_future(run(ticket))
    await aeventually(lambda: adm.queued == 1 and adm.in_flight == 1)
    assert adm.promote(ticket, 0)  # a follower with priority 0 joined its run
    await aeventually(lambda: adm.in_flight == 2 and adm.queued == 0)
    release.set()
    await asyncio.gather(first, waiter)
    assert (adm.in_flight, adm.queued) == (0, 0)


@pytest.mark.parametrize("reserved", [-1, 4])
def test_reserved_slots_out_of_range_are_refused(reserved):
    from ragserve import RAGConfig
    from ragserve.errors import ConfigError

    with pytest.raises(ValueError, match="reserved"):
        Admission(max_in_flight=4, max_queued=8, reserved=reserved)
    with pytest.raises(ConfigError, match="query.reserved_in_flight"):
        RAGConfig().replace(query={"max_in_flight": 4, "reserved_in_flight": reserved})


# -- through the pipeline --------------------------------------------------------------------


def held_rag(tmp_path, scheduling="priority", **sections):
    gen = FakeGenerator(delay=0.001)
    gen.hold = True
    rag = fake_rag(tmp_path, gen, query={"max_in_flight": 1, "max_queued": 64},
                   generate={"scheduling": scheduling}, **sections)
    return rag, gen


async def test_an_urgent_query_overtakes_30_queued_batch_queries_and_its_priority_reaches_vllm(tmp_path):
    rag, gen = held_rag(tmp_path, cache={"enabled": False})
    with rag:
        first = asyncio.ensure_future(rag.aquery("blocker question", priority=10))
        await aeventually(lambda: gen.running == 1)
        batch = [asyncio.ensure_future(rag.aquery(f"batch question {i}", priority=10)) for i in range(30)]
        await aeventually(lambda: rag.admission.queued == 30)
        urgent = asyncio.ensure_future(rag.aquery("urgent question", priority=0))
        await aeventually(lambda: rag.admission.queued == 31)
        gen.hold = False
        await asyncio.gather(first, urgent, *batch)
    assert "urgent question" in gen.prompts[1]  # next after the run that held the slot
    assert gen.priorities[0] == 10 and gen.priorities[1] == 0 and set(gen.priorities[2:]) == {10}


async def test_with_fcfs_scheduling_the_generator_is_not_given_a_priority(tmp_path):
    rag, gen = held_rag(tmp_path, scheduling="fcfs", cache={"enabled": False})
    gen.hold = False
    with rag:
        await rag.aquery("a question", priority=3)
    assert gen.priorities == [None]


async def test_a_follower_with_a_lower_number_raises_the_queued_run_it_joins(tmp_path):
    rag, gen = held_rag(tmp_path)
    with rag:
        first = asyncio.ensure_future(rag.aquery("blocker question", priority=10))
        await aeventually(lambda: gen.running == 1)
        batch = [asyncio.ensure_future(rag.aquery(f"batch question {i}", priority=10)) for i in range(5)]
        await aeventually(lambda: rag.admission.queued == 5)
        leader = asyncio.ensure_future(rag.aquery("shared question", priority=10))
        await aeventually(lambda: rag.admission.queued == 6)
        follower = asyncio.ensure_future(rag.aquery("shared question", priority=0))
        await aeventually(lambda: rag.stats()["single_flight"]["shared"] == 1)
        gen.hold = False
        results = await asyncio.gather(first, leader, follower, *batch)
    assert "shared question" in gen.prompts[1] and gen.priorities[1] == 0
    assert results[1].answer == results[2].answer and results[2].shared
    assert rag.admission.as_dict()["promoted"] == 1


def test_priority_is_not_part_of_the_cache_key(tmp_path):
    gen = FakeGenerator()
    with fake_rag(tmp_path, gen) as rag:
        assert rag.query("chunk number 3", priority=10).cache_tier == "miss"
        assert rag.query("chunk number 3", priority=-5).cache_tier == "l1"
    assert len(gen.prompts) == 1


@pytest.mark.parametrize("bad", ["high", -10**9, 10**9, True, 1.5, None])
def test_bad_priorities_are_refused_before_any_work(tmp_path, bad):
    gen = FakeGenerator()
    with fake_rag(tmp_path, gen) as rag:
        with pytest.raises(InvalidParameterError, match="priority must be an int"):
            rag.query("chunk number 3", priority=bad)
        with pytest.raises(InvalidParameterError, match="priority"):
            rag.stream("chunk number 3", priority=bad)
    assert gen.prompts == []



def test_the_openai_backend_sends_priority_only_with_the_priority_scheduler():
    from ragserve.config import GenerateConfig
    from ragserve.generators.completions import request_body

    assert "priority" not in request_body(GenerateConfig(), "m", "a prompt", None, 3)
    assert request_body(GenerateConfig(scheduling="priority"), "m", "a prompt", None, 3)["priority"] == 3


def test_an_unknown_scheduling_is_a_config_error():
    from ragserve.config import RAGConfig
    from ragserve.errors import ConfigError

    with pytest.raises(ConfigError, match="generate.scheduling"):
        RAGConfig().replace(generate={"scheduling": "lifo"})
