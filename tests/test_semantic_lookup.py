"""The semantic tier's lookup: the sign-code shortlist finds what the exact scan finds, the
codes stay aligned with the vectors through eviction and removal, and a partition read once
from Redis makes no Redis round trip on a lookup (later reads run in the background)."""

import asyncio

import numpy as np
import pytest

import ragserve.cache.semantic as semantic
from ragserve.cache.semantic import SHORTLIST, Partition, SemanticCache, code_bytes
from ragserve.config import SemanticConfig
from ragserve.testing.waits import aeventually, at_once

DIM = 384


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def paraphrase(rng: np.random.Generator, v: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector at cosine ``cos`` to the unit vector ``v``."""
    u = rng.normal(size=v.shape).astype(np.float32)
    u = unit(u - (u @ v) * v)
    return (cos * v + np.sqrt(1 - cos**2) * u).astype(np.float32)


@pytest.fixture(scope="module")
def full():
    """A partition of 20,000 entries (the shortlist path) and its vectors."""
    rng = np.random.default_rng(1)
    vectors = unit(rng.normal(size=(20_000, DIM)))
    part = Partition(max_entries=20_000)
    keys = [f"k{i}" for i in range(20_000)]
    assert part.extend(keys, keys, list(vectors)) == 20_000
    return part, vectors


def test_the_shortlist_finds_the_exact_nearest_and_its_exact_similarity(full):
    part, vectors = full
    rng = np.random.default_rng(2)
    assert part.n > SHORTLIST and part.codes.shape[1] == code_bytes(DIM) == 64
    for row in rng.choice(part.n, 200, replace=False):
        q = paraphrase(rng, vectors[row], float(rng.uniform(0.75, 0.95)))
        found, exact = part.nearest(q), part.scan(q)
        assert found[0] == exact[0] == row
        # The served similarity is the float32 cosine, not an estimate from the codes.
        assert found[1] == pytest.approx(float(vectors[row] @ q), abs=1e-5)


def test_codes_stay_aligned_with_vectors_through_eviction_and_removal():
    rng = np.random.default_rng(3)
    vectors = unit(rng.normal(size=(3_000, DIM)))
    part = Partition(max_entries=1_000)
    for start in range(0, 3_000, 250):  # pages, as a Redis read adds them
        keys = [f"k{i}" for i in range(start, start + 250)]
        part.extend(keys, keys, list(vectors[start: start + 250]))
    assert part.n <= 1_000 and "k2999" in part.rows and "k0" not in part.rows
    for key in [f"k{i}" for i in range(2_200, 2_700)]:  # past a quarter removed: compacted
        part.remove(key)
    assert part.removed < 300 and len(part.rows) == part.n - part.removed
    live = np.flatnonzero([bool(k) for k in part.keys])
    signs = np.packbits(part.vectors[live] > 0, axis=1)
    assert (part.codes[live, : signs.shape[1]] == signs).all()
    for key, row in part.rows.items():
        assert np.array_equal(part.vectors[row], vectors[int(key[1:])])
        q = paraphrase(rng, vectors[int(key[1:])], 0.9)
        assert part.nearest(q)[0] == row
    gone = paraphrase(rng, vectors[2_500], 0.99)  # removed: never its row again
    assert part.keys[part.nearest(gone)[0]] != "k2500"


def test_extend_skips_duplicates_and_other_dimensions():
    part = Partition(max_entries=10)
    v = unit(np.ones((3, 8)))
    assert part.extend(["a", "a", "b"], ["q", "q", "q"], list(v)) == 2
    assert part.extend(["a", "c"], ["q", "q"], [v[0], np.ones(4, np.float32)]) == 0
    assert part.codes.shape == (16, 8) and part.n == 2


class SlowRedis:
    """An L2 stand-in whose XRANGE waits until released, and records every call."""

    def __init__(self, entries):
        self.entries, self.calls, self.release = entries, 0, asyncio.Event()

    async def command(self, method, stream, start, end, count):
        assert method == "xrange"
        self.calls += 1
        await self.release.wait()
        cursor = start[1:]
        fresh = [e for e in self.entries if e[0] > cursor.encode()][:count]
        return True, fresh


def entry(i: int, v: np.ndarray):
    return f"{i:020d}-0".encode(), {b"k": f"k{i}".encode(), b"q": f"q{i}".encode(), b"v": v.tobytes()}


async def test_only_a_partitions_first_read_is_on_the_lookups_path():
    rng = np.random.default_rng(4)
    vectors = unit(rng.normal(size=(2, DIM)))
    redis = SlowRedis([entry(1, vectors[0])])
    tier = SemanticCache(SemanticConfig(enabled=True, threshold=0.8, guard="off", sync_interval_ms=0), redis)
    first = asyncio.ensure_future(tier.lookup("p", vectors[0], "q1"))
    await aeventually(lambda: redis.calls == 1)
    assert not first.done()  # a new partition waits for its first page: a new process sees shared entries
    redis.release.set()
    assert (await first).key == "k1"
    redis.release.clear()
    redis.entries.append(entry(2, vectors[1]))
    # Read once: a lookup now waits for nothing, and the new entry arrives in the background.
    assert at_once(tier.lookup("p", vectors[1], "q2")) is None
    assert tier.partitions["p"].syncing is not None
    await aeventually(lambda: redis.calls == 2)  # the background read, waiting for Redis
    assert at_once(tier.lookup("p", vectors[1], "q2")) is None and redis.calls == 2  # one read at a time
    redis.release.set()
    await aeventually(lambda: tier.stats.synced == 2)
    assert at_once(tier.lookup("p", vectors[1], "q2")).key == "k2"
    await tier.close()


async def test_a_long_catch_up_continues_in_the_background(monkeypatch):
    monkeypatch.setattr(semantic, "SYNC_PAGE", 4)
    rng = np.random.default_rng(5)
    vectors = unit(rng.normal(size=(10, DIM)))
    redis = SlowRedis([entry(i, vectors[i]) for i in range(10)])
    redis.release.set()
    config = SemanticConfig(enabled=True, threshold=0.8, guard="off", sync_interval_ms=60_000)
    tier = SemanticCache(config, redis)
    await tier.lookup("p", vectors[9], "q9")
    assert tier.stats.synced >= 4  # the first page on the path; the rest without waiting for the interval
    await aeventually(lambda: tier.stats.synced == 10)
    assert redis.calls == 3
    await tier.close()
