"""The semantic tier shared through a real Redis: two RAG instances (two processes' worth
of state) see each other's entries; a killed Redis fails no query."""

import pytest

from ragserve.cache.semantic import STREAM_PREFIX
from ragserve.testing.fakes import FakeGenerator, WordsEmbedder, fake_rag
from ragserve.testing.redis import redis_server
from ragserve.testing.waits import WAIT_S, eventually

pytestmark = pytest.mark.redis

PARAPHRASE = "please tell me who founded the company?"


@pytest.fixture
def server():
    with redis_server() as srv:
        yield srv


def _rag(folder, url, **semantic):
    return fake_rag(folder, FakeGenerator(), embedder=WordsEmbedder(), prompt={"max_score_gap": 0},
                    cache={"redis_url": url, "l2_cooldown_s": 0.1, "l2_timeout_ms": WAIT_S * 1000},
                    semantic={"enabled": True, "threshold": 0.75, "sync_interval_ms": 0, **semantic})


def test_two_instances_share_entries_through_redis(tmp_path, server):
    with _rag(tmp_path / "a", server.url) as a, _rag(tmp_path / "b", server.url) as b:
        assert a.query("who founded the company?").cache_tier == "miss"
        a.flush_cache()  # the entry's XADD and the answer's SET have reached Redis
        r = b.query(PARAPHRASE)
        assert r.cache_tier == "semantic" and r.semantic_match == "who founded the company?"
        assert len(b.generator.prompts) == 0
        assert b.stats()["cache"]["semantic"]["synced"] == 1
        assert b.query(PARAPHRASE, namespace="other").cache_tier == "miss"  # partitions hold in Redis too
        # A's own entry read back from the stream is not added twice.
        a.query("who founded that company?")
        assert a.stats()["cache"]["semantic"]["entries"] == 1


def test_a_new_process_reads_every_page(tmp_path, server, monkeypatch):
    import ragserve.cache.semantic as semantic

    monkeypatch.setattr(semantic, "SYNC_PAGE", 3)
    with _rag(tmp_path / "a", server.url) as a:
        a.query_batch([f"question number {i} about topic {i}" for i in range(7)])
        a.flush_cache()
    with _rag(tmp_path / "b", server.url) as b:
        b.query("unrelated words entirely", cache_write=False)  # the first page; the rest in the background
        eventually(lambda: b.stats()["cache"]["semantic"]["synced"] == 7, what="every page read")


def test_killed_redis_fails_no_query_and_the_tier_goes_on_locally(tmp_path, server):
    with _rag(tmp_path, server.url) as rag:
        rag.query("who founded the company?")
        rag.flush_cache()
        server.kill()
        questions = [PARAPHRASE] + [f"new question {i}" for i in range(10)]
        results = rag.query_batch(questions)
        assert not [r for r in results if isinstance(r, Exception)]
        assert results[0].cache_tier == "semantic"  # from the in-process vectors and L1
        assert rag.stats()["cache"]["l2"]["errors"] >= 1


def test_the_stream_expires_with_l2(tmp_path, server):
    import redis

    r = redis.Redis.from_url(server.url)
    before = set(r.keys(STREAM_PREFIX + "*"))
    with _rag(tmp_path, server.url) as rag:
        rag.query("who founded the company?")
        rag.flush_cache()
        keys = sorted(set(r.keys(STREAM_PREFIX + "*")) - before)  # this test's partition's stream
        assert len(keys) == 1 and 0 < r.pttl(keys[0]) <= 86_400_000
        assert r.xlen(keys[0]) == 1
