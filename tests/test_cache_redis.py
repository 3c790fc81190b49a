"""L2 on a real Redis server that the tests start and stop themselves (no fakes here)."""

import asyncio
import os
import pickle
import time

import pytest

from ragserve.cache.entries import encode_answer
from ragserve.cache.l2 import KEY_PREFIX, RedisL2
from ragserve.testing.contracts import CacheTierContract
from ragserve.testing.contracts import cached_answer as answer
from ragserve.testing.fakes import FakeGenerator, fake_rag
from ragserve.testing.redis import redis_server
from ragserve.testing.waits import WAIT_S, aeventually, at_once, eventually

pytestmark = pytest.mark.redis


@pytest.fixture
def server():
    with redis_server() as srv:
        yield srv


@pytest.fixture
async def l2(server):
    # A generous timeout: these tests are about behaviour, and a loaded machine can take far
    # longer than the production 50 ms (the tests of the timeout itself set their own).
    tier = RedisL2(server.url, timeout_s=WAIT_S, cooldown_s=0.2)
    yield tier
    await tier.close()


class TestL2Contract(CacheTierContract):
    @pytest.fixture
    async def tier(self, l2):
        return l2

    async def get(self, tier, key):
        return await tier.get(key)

    async def put(self, tier, key, value):
        assert await tier.put(key, value)


async def test_l2_ttl_expiry(server):
    tier = RedisL2(server.url, ttl_s=0.1, timeout_s=WAIT_S)
    # The get right after the put is inside the 100 ms TTL, unless the machine paused this test
    # in between (the first put also opens the connection): such a round is made again.
    for _ in range(20):
        t = time.monotonic()
        await tier.put("k", answer())
        fresh = await tier.get("k")
        if time.monotonic() - t < 0.1:
            break
    assert fresh is not None
    await asyncio.sleep(0.25)  # past the TTL (Redis checks it on access): longer only expires it more
    assert await tier.get("k") is None
    await tier.close()


class Evil:
    """Unpickling this would create a file: the cache must never unpickle anything."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


async def test_poisoned_values_are_misses_deleted_and_counted(l2, tmp_path):
    import redis.asyncio as aioredis

    marker = tmp_path / "pwned"
    raw = aioredis.from_url(l2.url)
    poisons = {"garbage": os.urandom(64), "schema": b'{"question": 1, "answer": []}',
               "pickle": pickle.dumps(Evil(str(marker))), "truncated": encode_answer(answer())[:-5]}
    for k, v in poisons.items():
        await raw.set(KEY_PREFIX + k, v)
    for k in poisons:
        assert await l2.get(k) is None
    await l2.drain()
    assert l2.stats.errors == len(poisons) and l2.stats.hits == 0
    assert not marker.exists()
    assert [await raw.exists(KEY_PREFIX + k) for k in poisons] == [0] * len(poisons)
    await raw.aclose()


async def test_oom_reply_is_a_counted_failure_not_an_exception(server):
    import redis.asyncio as aioredis

    raw = aioredis.from_url(server.url)
    await raw.config_set("maxmemory", "1")
    await raw.config_set("maxmemory-policy", "noeviction")
    tier = RedisL2(server.url, timeout_s=WAIT_S)
    assert await tier.put("k", answer(pad=10_000)) is False
    assert tier.stats.errors == 1 and "OutOfMemoryError" in tier.last_error
    await raw.config_set("maxmemory", "0")
    await raw.aclose()
    await tier.close()


async def _timed(awaitable):
    t = time.perf_counter()
    return await awaitable, time.perf_counter() - t


async def test_paused_redis_never_holds_a_lookup_past_the_timeout(server):
    l2 = RedisL2(server.url, timeout_s=0.05, cooldown_s=0.2)
    await l2.get("warm")  # the connection is open before the server stops answering
    server.pause()
    try:
        worst = 0.0
        for _ in range(10):
            # Beside each lookup, a bare timer of the same 50 ms on this loop: a loaded machine
            # makes both late alike; the lookup may outlast it by a margin, never by the server.
            (got, took), (_, timer) = await asyncio.gather(_timed(l2.get("k")), _timed(asyncio.sleep(0.05)))
            assert got is None
            worst = max(worst, took - timer)
        assert worst < 0.1, f"a lookup outlasted a bare 50 ms timer by {worst * 1e3:.0f} ms"
        assert l2.breaker.state in ("open", "half-open") and l2.stats.skipped > 0
    finally:
        server.resume()
    await l2.close()


async def test_breaker_recovers_by_itself_after_a_restart(server):
    tier = RedisL2(server.url, timeout_s=WAIT_S, cooldown_s=0.1)
    await tier.put("k", answer())
    server.kill()
    for _ in range(5):
        assert await tier.get("k") is None
    assert tier.breaker.state != "closed"
    server.start(timeout_s=WAIT_S)  # same port; data is gone, as after a real crash
    await asyncio.sleep(0.15)  # past the 0.1 s cooldown: waiting longer only makes it more over
    await aeventually(_probe_closes_the_breaker(tier), WAIT_S, 0.15, "a probe to close the breaker")
    assert await tier.put("k", answer("back"))
    assert (await tier.get("k")).answer == "back"
    await tier.close()


def _probe_closes_the_breaker(tier):
    """One lookup past the cooldown, which starts the background probe (a PING), then the
    probe's outcome. A probe a loaded machine keeps past its timeout reopens the breaker for
    another cooldown, and the next round probes again: only a probe ever closes it."""
    async def probed():
        assert await tier.get("k") is None  # skipped: the probe runs in the background
        await tier.drain()
        return tier.breaker.state == "closed"
    return probed


async def test_a_query_never_waits_for_the_breakers_probe(server):
    """Half-open on a hung server: the probe (a PING) waits out the timeout, queries don't."""
    tier = RedisL2(server.url, timeout_s=0.5, cooldown_s=0.05)
    await tier.put("k", answer())
    server.pause()
    try:
        for _ in range(3):  # the failures that open the breaker
            await tier.get("k")
        assert tier.breaker.state in ("open", "half-open")  # half-open already if the machine lagged 50 ms
        await asyncio.sleep(0.06)  # past the 50 ms cooldown: the next lookup starts the probe
        assert at_once(tier.get("k")) is None
        assert [t for t in tier.tasks if not t.done()], "no probe running in the background"
        for _ in range(20):
            # Not "fast" (a duration a loaded machine can exceed) but finished without waiting at
            # all, while the probe waits out its 500 ms on the hung server.
            assert at_once(tier.get("k")) is None
            await asyncio.sleep(0.01)
        await tier.drain()
        assert tier.breaker.state != "closed" and tier.stats.errors > 3  # probes failed too
    finally:
        server.resume()
    await asyncio.sleep(0.06)  # past the cooldown
    await aeventually(_probe_closes_the_breaker(tier), WAIT_S, 0.06, "a probe to close the breaker")
    await tier.close()


def _rag_with_l2(folder, url, generator=None):
    cache = {"redis_url": url, "l2_cooldown_s": 0.1, "l2_timeout_ms": WAIT_S * 1000}
    return fake_rag(folder, generator, prompt={"max_score_gap": 0}, cache=cache)


def test_l2_hit_backfills_l1_and_namespaces_are_separate(tmp_path, server):
    with _rag_with_l2(tmp_path, server.url) as rag:
        backfill_and_namespaces(rag)


def backfill_and_namespaces(rag):
    miss = rag.query("Where is Basel?")
    assert miss.cache_tier == "miss" and miss.timings.cache_l2 > 0 and miss.timings.generate > 0
    rag.flush_cache()
    rag.cache.l1.clear()
    r = rag.query("Where is Basel?")
    assert r.cache_tier == "l2" and r.timings.cache_l2 > 0
    assert rag.query("Where is Basel?").cache_tier == "l1"
    assert rag.query("Where is Basel?", namespace="other-tenant").cache_tier == "miss"
    assert len(rag.generator.prompts) == 2


class KillingGenerator(FakeGenerator):
    """Kills Redis from inside the run: after ``kill_at`` generations have started."""

    def __init__(self, server, kill_at):
        super().__init__()
        self.server, self.kill_at = server, kill_at

    async def stream(self, prompt, request_id, token_ids=None, deltas=True):
        if len(self.prompts) == self.kill_at:
            self.server.kill()
        async for piece in super().stream(prompt, request_id, token_ids, deltas):
            yield piece


def test_redis_killed_during_concurrent_queries_fails_no_query(tmp_path, server):
    cached = [f"cached question {i}" for i in range(20)]
    # Redis dies once 10 of the new questions have started generating (after the 20 above).
    with _rag_with_l2(tmp_path, server.url, KillingGenerator(server, kill_at=len(cached) + 10)) as rag:
        killed_under_load(rag, server, cached)


def killed_under_load(rag, server, cached):
    rag.query_batch(cached)
    rag.flush_cache()
    rag.cache.l1.clear()
    new = [f"new question {i}" for i in range(40)]
    batch = [q for pair in zip(new, cached + cached) for q in pair]  # L2 hits and misses interleaved
    results = rag.query_batch(batch)
    assert server.proc.poll() is not None  # Redis died while the batch was running
    failed = [r for r in results if isinstance(r, Exception)]
    assert not failed, failed[:3]
    assert [r.question for r in results] == batch and all(r.answer for r in results)
    assert rag.stats()["cache"]["l2"]["errors"] >= 1
    server.start(timeout_s=WAIT_S)
    time.sleep(0.15)  # past the 0.1 s cooldown: waiting longer only makes it more over

    def probe_closes_the_breaker():
        rag.cache.l1.clear()
        rag.query("after restart")  # sees the cooldown over: starts the probe, which closes the breaker
        rag.flush_cache()
        return rag.cache.l2.breaker.state == "closed"

    # A probe a loaded machine keeps past its 1 s timeout reopens it for another cooldown.
    eventually(probe_closes_the_breaker, WAIT_S, 0.15, "a probe to close the breaker")
    rag.query("after restart", cache_read=False)  # this answer now reaches L2
    rag.flush_cache()
    rag.cache.l1.clear()
    assert rag.query("after restart").cache_tier == "l2"


def test_embedded_server_starts_and_stops(tmp_path):
    from ragserve.cache.answers import AnswerCache
    from ragserve.config import CacheConfig

    cache = AnswerCache(CacheConfig(redis_url="embedded"), "a")
    assert cache.server is not None and cache.server.url.startswith("unix://")
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(cache.l2.put("k", answer()))
        assert loop.run_until_complete(cache.l2.get("k")) is not None
        loop.run_until_complete(cache.close())
    finally:
        loop.close()
    proc = cache.server.proc
    cache.stop_server()
    assert proc.poll() is not None


@pytest.mark.integration
def test_rebuilt_index_gets_zero_stale_hits(tmp_path, xquad_corpus, replay_embedder, server):
    import shutil

    from ragserve import RAG, RAGConfig
    from ragserve.build.builder import build_index
    from ragserve.testing.fakes import FakeGenerator

    src = tmp_path / "src"
    shutil.copytree(xquad_corpus[0], src)
    build_index(src, tmp_path / "idx", embedder=replay_embedder)
    cfg = RAGConfig().replace(cache={"redis_url": server.url, "l2_timeout_ms": WAIT_S * 1000})
    questions = [q["question"] for q in xquad_corpus[1][:10]]

    def ask_all():
        with RAG.from_index(tmp_path / "idx", cfg, start_engine=False, embedder=replay_embedder,
                            generator=FakeGenerator()) as rag:
            tiers = [rag.query(q).cache_tier for q in questions]
            rag.flush_cache()
            return tiers, rag.fingerprint

    tiers, fp1 = ask_all()
    assert set(tiers) == {"miss"}
    tiers, _ = ask_all()
    assert set(tiers) == {"l2"}  # a new process (empty L1) is served from Redis
    first = sorted(src.glob("*.txt"))[0]
    first.write_text(first.read_text() + " A changed sentence.")
    build_index(src, tmp_path / "idx", embedder=replay_embedder)
    tiers, fp2 = ask_all()
    assert fp2 != fp1 and set(tiers) == {"miss"}


def test_embedded_server_dies_with_a_killed_parent(tmp_path):
    import signal
    import subprocess
    import sys

    code = ("import sys, time; from ragserve.cache.redis_server import RedisServer; "
            f"s = RedisServer().start(timeout_s={WAIT_S}); print(s.proc.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    os.kill(pid, 0)  # the server runs
    parent.send_signal(signal.SIGKILL)  # no cleanup code runs in the parent
    parent.wait()

    def gone():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        eventually(gone, WAIT_S, 0.05, "the embedded redis-server to die with its killed parent")
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        raise
