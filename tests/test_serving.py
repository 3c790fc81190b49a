"""Concurrent serving logic with fakes: micro-batching, admission, deadlines, cancellation,
streaming. (The same behaviour against the real engine: test_engine.py.)"""

import asyncio
import threading
import time

import pytest

from ragserve.engine.admission import Admission
from ragserve.errors import DeadlineExceededError, OverloadedError
from ragserve.retrieval.embed import MicroBatcher
from ragserve.testing.fakes import FakeGenerator
from ragserve.testing.fakes import fake_rag as make_rag
from ragserve.testing.waits import WAIT_S, aeventually, at_once, eventually
from ragserve.types import DoneEvent, SourcesEvent, TokenEvent

# -- micro-batcher ---------------------------------------------------------------------


def recorder():
    calls = []

    def fn(items):
        calls.append((list(items), threading.current_thread().name))
        time.sleep(0.005)
        return [x * 10 for x in items]

    return calls, fn


async def test_concurrent_submissions_share_one_call_off_the_event_loop():
    calls, fn = recorder()
    b = MicroBatcher(fn, None, window_s=0.05, max_batch=64)
    out = await asyncio.gather(*(b.submit(i) for i in range(32)))
    assert [r for r, _ in out] == [i * 10 for i in range(32)]
    assert len(calls) == 1 and calls[0][0] == list(range(32))
    assert calls[0][1] != threading.current_thread().name  # ran on an executor thread
    assert all(wait >= 0 for _, wait in out) and (b.batches, b.items) == (1, 32)


async def test_max_batch_caps_a_call_and_arrivals_during_a_batch_go_next():
    calls, fn = recorder()
    b = MicroBatcher(fn, None, window_s=0.05, max_batch=8)
    out = await asyncio.gather(*(b.submit(i) for i in range(20)))
    assert [r for r, _ in out] == [i * 10 for i in range(20)]
    assert [len(c) for c, _ in calls] == [8, 8, 4]


async def test_max_batch_one_is_one_call_per_item():
    calls, fn = recorder()
    b = MicroBatcher(fn, None, window_s=0.05, max_batch=1)
    await asyncio.gather(*(b.submit(i) for i in range(5)))
    assert [c for c, _ in calls] == [[0], [1], [2], [3], [4]]


async def test_a_cancelled_submission_leaves_its_batch_and_errors_reach_every_item():
    calls, fn = recorder()
    b = MicroBatcher(fn, None, window_s=0.05, max_batch=64)
    doomed = asyncio.ensure_future(b.submit(99))
    kept = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0)
    doomed.cancel()
    assert (await kept)[0] == 10 and calls[0][0] == [1]

    def broken(items):
        raise ValueError("model failed")

    bad = MicroBatcher(broken, None, window_s=0.0, max_batch=64)
    results = await asyncio.gather(bad.submit(1), bad.submit(2), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)


# -- admission -------------------------------------------------------------------------


async def test_admission_rejects_at_once_past_both_bounds_and_serves_in_order():
    adm = Admission(max_in_flight=2, max_queued=2)
    order, release = [], asyncio.Event()

    async def run(i):
        async with adm.slot():
            order.append(i)
            await release.wait()

    tasks = [asyncio.ensure_future(run(i)) for i in range(4)]
    await asyncio.sleep(0.01)
    assert (adm.in_flight, adm.queued) == (2, 2) and order == [0, 1]
    with pytest.raises(OverloadedError, match="2 requests running and 2 waiting"):
        at_once(adm.slot().__aenter__())  # refused in its first step: it waited for nothing
    assert adm.rejected == 1
    tasks[2].cancel()  # a waiter that gives up frees its place in the queue
    await asyncio.sleep(0)
    assert adm.queued == 1
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 3] and (adm.in_flight, adm.queued) == (0, 0)


async def test_a_waiter_cancelled_in_the_loop_turn_its_slot_is_released_ends_cancelled():
    adm = Admission(max_in_flight=1, max_queued=4)
    waiting: asyncio.Future | None = None

    async def hold():
        async with adm.slot():
            await asyncio.sleep(0.01)
            waiting.cancel()  # e.g. the waiter's deadline fires in the turn this slot is released

    async def wait():
        async with adm.slot():
            pass

    holder = asyncio.ensure_future(hold())
    await asyncio.sleep(0)
    waiting = asyncio.ensure_future(wait())
    await asyncio.sleep(0)
    assert adm.queued == 1
    await holder
    with pytest.raises(asyncio.CancelledError):  # not a ValueError from the queue
        await waiting
    assert (adm.in_flight, adm.queued) == (0, 0)
    async with adm.slot():  # the slot was not lost
        assert adm.in_flight == 1


# -- the pipeline under concurrency ---------------------------------------------------------


def test_concurrent_queries_each_get_their_own_answer_in_few_embedding_calls(tmp_path):
    with make_rag(tmp_path, embed={"batch_window_ms": 20}) as rag:
        questions = [f"question number {i}" for i in range(32)]
        out = rag.query_batch(questions)
        assert [r.question for r in out] == questions
        assert rag.embedder.calls < 8  # 32 questions, a handful of model calls
        assert all(r.timings.embed_wait >= 0 and r.timings.embed > 0 for r in out)
        assert rag.stats()["embed_batches"]["mean_batch"] > 4


async def test_overload_is_refused_at_once_before_any_work(tmp_path):
    gen = FakeGenerator(delay=0.5)
    with make_rag(tmp_path, gen, query={"max_in_flight": 1, "max_queued": 1}) as rag:
        gen.hold = True  # the first stays in flight and the second queued for as long as this takes
        tasks = [asyncio.ensure_future(rag.aquery(f"q{i}")) for i in range(2)]
        await aeventually(lambda: (rag.stats()["admission"]["in_flight"], rag.stats()["admission"]["queued"],
                                   len(gen.prompts)) == (1, 1, 1), what="one query generating, one queued")
        # Refused while the slot is held, with no slot ever freeing: it did not wait for one.
        # (Not a duration: the refusal crosses to the engine's loop and back.)
        with pytest.raises(OverloadedError):
            await asyncio.wait_for(rag.aquery("one too many"), WAIT_S)
        assert rag.stats()["admission"]["rejected"] == 1 and len(gen.prompts) == 1
        gen.hold = False
        await asyncio.gather(*tasks)
        assert rag.stats()["admission"]["in_flight"] == 0


def test_query_batch_never_overloads_itself(tmp_path):
    with make_rag(tmp_path, query={"max_in_flight": 2, "max_queued": 0}) as rag:
        out = rag.query_batch([f"q{i}" for i in range(10)])
        assert not [r for r in out if isinstance(r, Exception)]


async def test_a_deadline_aborts_one_request_while_the_others_complete(tmp_path):
    gen = FakeGenerator(delay=0.4)
    with make_rag(tmp_path, gen) as rag:
        slow = asyncio.ensure_future(rag.aquery("has a deadline", timeout_s=0.1))
        others = [asyncio.ensure_future(rag.aquery(f"no deadline {i}")) for i in range(3)]
        with pytest.raises(DeadlineExceededError, match="0.1 s"):
            await slow
        assert all(r.answer for r in await asyncio.gather(*others))
        assert gen.running == 0 and rag.stats()["timeouts"] == 1
        assert rag.query("has a deadline", timeout_s=0).cache_tier == "miss"  # nothing was cached


async def test_cancelling_the_caller_aborts_its_generation_and_caches_nothing(tmp_path):
    gen = FakeGenerator(delay=60.0)  # a minute: only an abort ends it within the waits below
    with make_rag(tmp_path, gen) as rag:
        task = asyncio.ensure_future(rag.aquery("cancel me"))
        await aeventually(lambda: gen.running, what="the generation to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await aeventually(lambda: gen.running == 0, what="the generation to be aborted")
        assert gen.running == 0 and len(rag.cache.l1) == 0
        assert rag.stats()["cancelled"] == 1 and rag.stats()["admission"]["in_flight"] == 0


# -- streaming -------------------------------------------------------------------------


def test_stream_gives_sources_then_tokens_then_the_result_and_a_hit_streams_too(tmp_path):
    with make_rag(tmp_path, FakeGenerator(words=4)) as rag:
        events = list(rag.stream("stream this"))
        assert isinstance(events[0], SourcesEvent) and events[0].cache_tier == "miss"
        assert isinstance(events[-1], DoneEvent)
        tokens = [e.text for e in events if isinstance(e, TokenEvent)]
        assert len(tokens) == 4 and "".join(tokens) == events[-1].result.answer
        assert events[-1].result.timings.total > 0
        again = list(rag.stream("stream this"))
        assert again[0].cache_tier == "l1" and [type(e) for e in again] == [SourcesEvent, TokenEvent, DoneEvent]
        assert again[1].text == events[-1].result.answer


def test_leaving_a_stream_early_aborts_it_and_caches_nothing(tmp_path):
    # a piece every 0.1 s for a minute: only an abort ends it within the wait below
    gen = FakeGenerator(delay=60.0, words=600)
    with make_rag(tmp_path, gen) as rag:
        for event in rag.stream("stop early"):
            if isinstance(event, TokenEvent):
                break
        eventually(lambda: gen.running == 0, WAIT_S, 0.01, "the stream's generation to be aborted")
        assert gen.running == 0 and len(rag.cache.l1) == 0
        assert rag.stats()["admission"]["in_flight"] == 0


async def test_astream_from_another_event_loop(tmp_path):
    with make_rag(tmp_path, FakeGenerator(words=3)) as rag:
        events = [e async for e in rag.astream("async stream")]
        assert [type(e) for e in events] == [SourcesEvent, TokenEvent, TokenEvent, TokenEvent, DoneEvent]


@pytest.mark.integration
def test_embedding_and_search_never_block_the_event_loop(xquad_index, xquad_corpus):
    """Loop lag on the engine loop while 96 real MiniLM retrievals run concurrently."""
    from ragserve import RAG, RAGConfig

    questions = [q["question"] for q in xquad_corpus[1][:96]]
    with RAG.from_index(xquad_index, RAGConfig(), start_engine=False) as rag:
        rag.retrieve("warm up")
        lags: list[float] = []
        stop = asyncio.Event()

        async def ticker():
            while not stop.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append((time.perf_counter() - t - 0.001) * 1e3)

        async def load():
            tick = asyncio.ensure_future(ticker())
            out = await asyncio.gather(*(rag.retriever.retrieve(q, 3, __import__("ragserve.observe.timing", fromlist=["x"]).StageClock())
                                         for q in questions))
            stop.set()
            await tick
            return out

        out = rag.call(load())
        assert all(len(s) == 3 for s in out)
        assert rag.stats()["embed_batches"]["mean_batch"] > 1
    lags.sort()
    assert len(lags) > 10
    # A model call on the loop would show as a lag of its whole duration (tens of ms per
    # batch here); the bound is generous for a loaded 2-core machine.
    assert lags[int(len(lags) * 0.99)] < 50, f"p99 loop lag {lags[int(len(lags) * 0.99)]:.1f} ms"


def test_close_cancels_requests_still_running_instead_of_dropping_them(tmp_path):
    import concurrent.futures

    gen = FakeGenerator(delay=120)
    rag = make_rag(tmp_path, gen)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(rag.query, "still generating")
        eventually(lambda: gen.running, WAIT_S, 0.01, "the generation to start")
        t = time.perf_counter()
        rag.close()
        # it cancels instead of waiting out the 120 s generation (30 s: a loaded machine's bound)
        assert time.perf_counter() - t < WAIT_S
        with pytest.raises(concurrent.futures.CancelledError):
            pending.result(timeout=WAIT_S)
    assert gen.running == 0  # its generation was cancelled (vLLM would abort it)


# -- one miss path: streams share runs, observers hear every request ------------------


async def test_streams_and_plain_queries_share_one_run_and_each_gets_its_own_request_id(tmp_path):
    gen = FakeGenerator(delay=0.2, words=4)
    with make_rag(tmp_path, gen) as rag:
        async def streamed(rid):
            return [e async for e in rag.astream("shared", request_id=rid)]

        s1, s2, plain = await asyncio.gather(streamed("s-1"), streamed("s-2"), rag.aquery("shared", request_id="p-1"))
        assert len(gen.prompts) == 1 and gen.request_ids == ["s-1"]  # the leader's id reaches the engine
        for events, rid in ((s1, "s-1"), (s2, "s-2")):
            tokens = [e.text for e in events if isinstance(e, TokenEvent)]
            assert len(tokens) == 4 and events[-1].result.request_id == rid
        assert plain.answer == s1[-1].result.answer and plain.request_id == "p-1"
        assert rag.stats()["single_flight"] == {"runs": 1, "shared": 2, "running": 0}


async def test_a_plain_query_asks_the_engine_for_the_final_output_only(tmp_path):
    class Recording(FakeGenerator):
        def __init__(self):
            super().__init__(words=3)
            self.deltas = []

        async def stream(self, prompt, request_id, token_ids=None, deltas=True):
            self.deltas.append(deltas)
            async for piece in super().stream(prompt, request_id, token_ids, deltas):
                yield piece

    gen = Recording()
    with make_rag(tmp_path, gen) as rag:
        r = await rag.aquery("final only")
        events = [e async for e in rag.astream("tokens please")]
        assert gen.deltas == [False, True] and r.answer == "an answer more"
        assert [type(e) for e in events].count(TokenEvent) == 3


def test_observers_hear_every_result_and_every_failure_once(tmp_path):
    class Recorder:
        def __init__(self):
            self.results, self.errors = [], []

        def on_result(self, result, stages):
            self.results.append((result.cache_tier, "total" in stages))

        def on_error(self, error):
            self.errors.append(type(error).__name__)

    class Broken:
        def on_result(self, result, stages):
            raise RuntimeError("observer bug")

        def on_error(self, error):
            raise RuntimeError("observer bug")

    rec = Recorder()
    with make_rag(tmp_path, FakeGenerator(fail_on="poison"), query={"max_in_flight": 1, "max_queued": 0}) as rag:
        rag.observers.add(Broken())  # a broken observer fails no request
        rag.observers.add(rec)
        rag.query("fine")
        rag.query("fine")
        list(rag.stream("streamed"))
        for bad in ("", "poison"):
            with pytest.raises(Exception):
                rag.query(bad)
        assert rec.results == [("miss", True), ("l1", True), ("miss", True)]
        assert rec.errors == ["EmptyQuestionError", "RuntimeError"]
        assert rag.stats()["stages"]["total"]["count"] == 3  # the rolling stats are an observer too


async def test_a_plain_query_joins_a_streaming_run(tmp_path):
    gen = FakeGenerator(delay=0.4, words=4)
    with make_rag(tmp_path, gen) as rag:
        async def streamed():
            return [e async for e in rag.astream("joined")]

        gen.hold = True  # the streaming run stays in flight until the plain query has chosen
        stream = asyncio.ensure_future(streamed())
        await aeventually(lambda: gen.running == 1, what="the streaming run to start")
        plain = asyncio.ensure_future(rag.aquery("joined"))
        await aeventually(lambda: gen.running == 2 or rag.stats()["single_flight"]["shared"],
                          what="the plain query to join the run or start one")
        gen.hold = False
        plain, events = await plain, await stream
        assert len(gen.prompts) == 1 and plain.shared and not events[-1].result.shared
        assert plain.answer == events[-1].result.answer


async def test_a_lookup_that_outlasts_the_run_it_missed_is_an_l1_hit_not_a_second_generation(tmp_path):
    gen = FakeGenerator(delay=0.05, words=2)
    with make_rag(tmp_path, gen) as rag:
        cache, calls = rag.cache, []
        lookup = cache.lookup

        async def slow_after_the_first(key, clock, *, l1=True):
            calls.append(key)
            found = await lookup(key, clock, l1=l1)
            if len(calls) == 2:  # an L2 (Redis) lookup still out when the first run ends
                gen.hold = False
                await aeventually(lambda: len(cache.l1) == 1, what="the first run's answer in L1")
            return found

        cache.lookup = slow_after_the_first
        gen.hold = True  # the first run is generating until the second has missed L1
        first = asyncio.ensure_future(rag.aquery("asked twice"))
        await aeventually(lambda: gen.running == 1, what="the first run to start")
        second = await rag.aquery("asked twice")
        assert (await first).cache_tier == "miss"
        assert len(gen.prompts) == 1, "generated again after its answer was cached"
        assert second.cache_tier == "l1" and second.answer == (await first).answer
        assert rag.stats()["cache"]["l1"]["misses"] == 2  # the second look is not counted again
