"""A Redis that stops answering under HTTP load (SIGSTOP of the real redis-server the test
starts, then SIGCONT): every request is still answered, none waits for Redis past the L2
timeout (the breaker opens and L2 is skipped), /health says ``degraded`` but stays 200, and
L2 comes back by itself once Redis does. Fake models behind a real loopback HTTP server."""

import asyncio
import time

import httpx
import pytest

from ragserve.config import RAGConfig
from ragserve.server.app import create_app
from ragserve.testing.fakes import FakeGenerator, fake_rag
from ragserve.testing.http import running
from ragserve.testing.redis import redis_server
from ragserve.testing.waits import HTTP_TIMEOUT_S, WAIT_S

pytestmark = [pytest.mark.http, pytest.mark.redis]
L2_TIMEOUT_S = 0.2
PAUSE_S = 4.0
SLACK_S = 2.0
"""What a loaded 2-core machine may add to the L2 timeout before a request is answered."""
WORKERS = 6
PRIMED = [f"primed question {i}" for i in range(12)]


class Load:
    """``WORKERS`` clients asking, one after the other, a question L2 holds then a new one."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.done: list[dict] = []  # one record per request
        self.stop = asyncio.Event()
        self.count = 0

    async def worker(self, w: int) -> None:
        while not self.stop.is_set():
            self.count += 1
            question = PRIMED[self.count % len(PRIMED)] if self.count % 2 else f"new question {self.count}"
            t0 = time.monotonic()
            r = await self.client.post("/v1/query", json={"question": question})
            rec = {"start": t0, "end": time.monotonic(), "status": r.status_code, "tier": r.headers.get("x-cache")}
            if r.status_code == 200:
                rec["cache_l2_s"] = r.json()["timings"].get("cache_l2", 0.0) / 1e3
            self.done.append(rec)


async def under_load(url: str, redis) -> tuple[list[dict], list[tuple[float, int, str]], float, float]:
    """(requests, /health probes (time, status, l2), when Redis was paused, resumed)."""
    async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT_S,
                                 limits=httpx.Limits(max_connections=WORKERS + 2)) as client:
        for q in PRIMED:  # into L2 (L1 is off: every repeat goes to Redis)
            assert (await client.post("/v1/query", json={"question": q})).status_code == 200
        load, health = Load(client), []

        async def probe() -> None:
            while not load.stop.is_set():
                r = await client.get("/health")
                health.append((time.monotonic(), r.status_code, r.json()["l2"]))
                await asyncio.sleep(0.1)

        tasks = [asyncio.ensure_future(load.worker(w)) for w in range(WORKERS)]
        tasks.append(asyncio.ensure_future(probe()))
        try:
            await asyncio.sleep(1.0)
            paused = time.monotonic()
            redis.pause()
            try:
                await asyncio.sleep(PAUSE_S)
            finally:
                resumed = time.monotonic()
                redis.resume()
            deadline = resumed + WAIT_S
            while time.monotonic() < deadline and not (health and health[-1][2] == "ok" and health[-1][0] > resumed):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # requests served by L2 again
        finally:
            load.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        return load.done, health, paused, resumed


def test_a_paused_redis_fails_no_request_and_l2_comes_back(tmp_path):
    cache = {"redis_url": "", "l1_max_entries": 0, "l2_timeout_ms": L2_TIMEOUT_S * 1e3, "l2_cooldown_s": 0.3}
    with redis_server() as redis:
        cache["redis_url"] = redis.url
        config = RAGConfig().replace(cache=cache)
        rag = fake_rag(tmp_path, FakeGenerator(words=2, delay=0.01), config=config)
        with rag, running(create_app(rag, config)) as url:
            done, health, paused, resumed = asyncio.run(under_load(url, redis))
            stats = rag.stats()["cache"]["l2"]

    failed = [r for r in done if r["status"] != 200]
    assert not failed, failed[:3]
    during = [r for r in done if paused <= r["start"] and r["end"] < resumed]
    assert len(during) >= WORKERS, f"only {len(during)} requests were answered while Redis was paused"
    # No request waited for Redis: one that began while it was paused ended before it came back.
    stuck = [r for r in done if paused <= r["start"] < resumed - SLACK_S - L2_TIMEOUT_S and r["end"] >= resumed]
    assert not stuck, f"{len(stuck)} requests waited for the paused Redis: {stuck[:3]}"
    assert max(r["cache_l2_s"] for r in done) < L2_TIMEOUT_S + SLACK_S
    assert all(status == 200 for _, status, _ in health)  # degraded is still healthy
    assert any(l2 != "ok" for t, _, l2 in health if paused <= t < resumed), "the breaker never opened"
    assert health[-1][2] == "ok", "L2 did not come back after SIGCONT"
    back = [r for r in done if r["start"] > health[-1][0] - 0.5]
    assert stats["errors"] >= 1 and stats["skipped"] >= 1
    assert any(r["tier"] == "l2" for r in done if r["start"] < paused)
    assert any(r["tier"] == "l2" for r in done if r["start"] > resumed), "no L2 hit once Redis was back"
    assert back  # load went on after the recovery
