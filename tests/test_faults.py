"""Fault injection where a crash could lose or corrupt data: docstore writes, the middle of
a micro-batch, an L2 write and its TTL (a real Redis the test starts itself)."""

import asyncio
import os
import threading

import numpy as np
import pytest

from ragserve.errors import IndexIntegrityError
from ragserve.retrieval.docstore import CHUNKS_FILE, OFFSETS_FILE, LazyDocStore, write_docstore
from ragserve.retrieval.embed import MicroBatcher
from ragserve.testing.waits import WAIT_S, aeventually
from ragserve.types import Chunk


def _chunks(n, tag):
    return [Chunk(i, f"doc{i}.txt", f"{tag} chunk {i}", {"i": i}) for i in range(n)]


def _failing_at(k, chunks, error):
    for c in chunks:
        if c.chunk_id == k:
            raise error
        yield c


# -- docstore writes ----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [
    lambda new: _failing_at(10, new, OSError(28, "No space left on device")),
    lambda new: _failing_at(10, new, KeyboardInterrupt()),
    lambda new: new[:10] + [Chunk(10, "bad.txt", "x", {"value": object()})],  # cannot be encoded
])
def test_a_docstore_write_that_dies_half_way_leaves_the_old_store_whole(tmp_path, fault):
    write_docstore(tmp_path, _chunks(50, "old"))
    with pytest.raises((OSError, KeyboardInterrupt, TypeError)):
        write_docstore(tmp_path, fault(_chunks(30, "new")))
    store = LazyDocStore(tmp_path)
    assert len(store) == 50 and store.get(49).text == "old chunk 49" and store.get(10).text == "old chunk 10"
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHUNKS_FILE, OFFSETS_FILE]  # no temp files left


def test_a_crash_between_the_two_renames_is_refused_not_served(tmp_path, monkeypatch):
    write_docstore(tmp_path, _chunks(50, "old"))
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies after the lines, before the offsets
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        write_docstore(tmp_path, _chunks(30, "new"))
    monkeypatch.undo()
    with pytest.raises(IndexIntegrityError, match="offsets do not match the file size"):
        LazyDocStore(tmp_path)


@pytest.mark.parametrize("name", [CHUNKS_FILE, OFFSETS_FILE])
def test_a_docstore_missing_a_file_is_an_integrity_error(tmp_path, name):
    write_docstore(tmp_path, _chunks(5, "x"))
    (tmp_path / name).unlink()
    with pytest.raises(IndexIntegrityError, match="missing"):
        LazyDocStore(tmp_path)


def test_offsets_that_need_pickle_are_refused(tmp_path):
    write_docstore(tmp_path, _chunks(5, "x"))
    np.save(tmp_path / OFFSETS_FILE, np.array([0, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(IndexIntegrityError, match="not a plain .npy array"):
        LazyDocStore(tmp_path)


# -- the middle of a micro-batch ----------------------------------------------------------------


async def test_a_model_that_dies_mid_batch_fails_that_batch_only_and_the_next_one_runs():
    healthy = asyncio.Event()
    calls = []

    def fn(items):
        calls.append(list(items))
        if not healthy.is_set():
            raise RuntimeError("CUDA error: device-side assert")  # broken for everyone, for now
        return [i + 1 for i in items]

    b = MicroBatcher(fn, None, window_s=0.02, max_batch=64)
    out = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in out)  # no hang, every caller told
    healthy.set()
    assert [r for r, _ in await asyncio.gather(*(b.submit(i) for i in range(4)))] == [1, 2, 3, 4]
    assert b.queued == 0


async def test_a_caller_cancelled_while_its_batch_runs_does_not_disturb_the_others():
    started = asyncio.Event()
    cancelled = threading.Event()
    loop = asyncio.get_running_loop()

    def fn(items):
        loop.call_soon_threadsafe(started.set)
        assert cancelled.wait(WAIT_S), "the caller was never cancelled"  # the model call runs until then
        return [i * 2 for i in items]

    b = MicroBatcher(fn, None, window_s=0.01, max_batch=64)
    tasks = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
    await started.wait()
    tasks[1].cancel()  # mid-batch: the model call is already running
    await asyncio.sleep(0)  # the cancellation lands
    cancelled.set()
    first, middle, last = await asyncio.gather(*tasks, return_exceptions=True)
    assert first[0] == 0 and last[0] == 4 and isinstance(middle, asyncio.CancelledError)


# -- between an L2 write and its TTL ------------------------------------------------------------


@pytest.mark.redis
async def test_an_l2_write_cut_off_by_a_timeout_still_lands_with_its_ttl():
    """A key without a TTL would live forever (and outlive its index). The value and its
    TTL go in one SET ... PX: there is no moment between them for a crash to fall into,
    even when the client gives up on the reply."""
    import redis.asyncio as aioredis

    from ragserve.cache.l2 import KEY_PREFIX, RedisL2
    from ragserve.testing.contracts import cached_answer as answer
    from ragserve.testing.redis import redis_server

    with redis_server() as server:
        raw = aioredis.from_url(server.url)
        tier = RedisL2(server.url, ttl_s=60.0, timeout_s=0.05)
        assert await tier.get("warm-up") is None  # the connection is open before the fault
        # The server stalls (DEBUG SLEEP) with the SET already sent: the client gives up on
        # the reply, and the server applies the write afterwards. On a loaded machine the SET
        # can miss the stall (sent before it began, or after it ended): then it simply
        # succeeds, and the round is made again with another key, until one is cut off.
        for attempt in range(20):
            key = f"k{attempt}"
            sleeper = asyncio.ensure_future(raw.execute_command("DEBUG", "SLEEP", "0.3"))
            await asyncio.sleep(0.05)
            cut = await tier.put(key, answer()) is False
            await sleeper
            if cut:
                break
        assert cut and tier.stats.errors == 1  # the client gave up: a counted failure
        # The write sits behind the sleep on the tier's own connection: it lands just after.
        await aeventually(lambda: raw.exists(KEY_PREFIX + key), WAIT_S, 0.01, "the cut-off write to land")
        ttl_ms = await raw.pttl(KEY_PREFIX + key)
        assert await raw.exists(KEY_PREFIX + key) == 1 and 0 < ttl_ms <= 60_000
        keys = [k async for k in raw.scan_iter(match=KEY_PREFIX + "*")]
        assert keys and all(ttl > 0 for ttl in [await raw.pttl(k) for k in keys])  # no key without a TTL
        await tier.close()
        await raw.aclose()
