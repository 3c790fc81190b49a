"""Cache logic: keys, the tier contract on L1, single-flight, and the pipeline's use of them."""

import asyncio
import time

import pytest

from ragserve.cache.keys import cache_key, normalize_question
from ragserve.cache.l1 import L1Cache
from ragserve.testing.contracts import CacheTierContract
from ragserve.testing.contracts import cached_answer as answer


def test_normalisation_and_keys():
    assert normalize_question("  What\u00a0is\tＦＡＩＳＳ?\n") == "What is FAISS?"
    base = dict(index_fingerprint="i", answer_fingerprint="a", namespace="n")
    k = cache_key("q", **base)
    assert len(k) == 64 and k == cache_key("q", **base)
    for change in ({"index_fingerprint": "i2"}, {"answer_fingerprint": "a2"}, {"namespace": "n2"}):
        assert cache_key("q", **{**base, **change}) != k
    assert cache_key("q2", **base) != k


def test_a_cached_answer_keeps_its_origin_span_and_records_without_one_still_decode():
    import msgspec

    from ragserve.cache.entries import CachedAnswer, decode_answer, encode_answer
    from ragserve.types import SpanRef

    origin = SpanRef("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    value = msgspec.structs.replace(answer("a"), origin=origin)
    back = decode_answer(encode_answer(value))
    assert back == value and back.origin == origin
    # A record written before the origin was kept (or written untraced): no origin, no link.
    before = msgspec.json.encode({k: v for k, v in msgspec.structs.asdict(value).items() if k != "origin"})
    assert b"origin" not in before and decode_answer(before) == msgspec.structs.replace(value, origin=None)
    # ... and a reader that does not know the field ignores it.
    fields = [(f, object) for f in CachedAnswer.__struct_fields__ if f != "origin"]
    legacy = msgspec.defstruct("Legacy", fields)
    assert msgspec.json.decode(encode_answer(value), type=legacy).answer == value.answer


class TestL1Contract(CacheTierContract):
    @pytest.fixture
    def tier(self):
        return L1Cache()

    async def get(self, tier, key):
        return tier.get(key)

    async def put(self, tier, key, value):
        tier.put(key, value)


def test_l1_ttl_expiry():
    # The get right after the put is inside the 50 ms TTL, unless the machine paused this test
    # in between: such a round proves nothing and is made again, on a new cache.
    for _ in range(20):
        c, t = L1Cache(ttl_s=0.05), time.monotonic()
        c.put("k", answer())
        fresh = c.get("k")
        if time.monotonic() - t < 0.05:
            break
    assert fresh is not None
    time.sleep(0.08)  # past the TTL: waiting longer only makes it more expired
    assert c.get("k") is None and c.stats.expired == 1 and len(c) == 0 and c.bytes == 0


def test_l1_evicts_least_recently_used_at_entry_bound():
    c = L1Cache(max_entries=3)
    for k in "abc":
        c.put(k, answer(k))
    c.get("a")  # a is now the most recent
    c.put("d", answer("d"))
    assert c.get("b") is None and c.get("a") is not None and len(c) == 3 and c.stats.evictions == 1


def test_l1_evicts_at_byte_bound_and_skips_oversized_values():
    one = len(__import__("ragserve.cache.entries", fromlist=["x"]).encode_answer(answer(pad=1000)))
    c = L1Cache(max_entries=100, max_bytes=one * 2 + 10)
    for k in "abc":
        c.put(k, answer(pad=1000))
    assert len(c) == 2 and c.bytes <= c.max_bytes and c.get("a") is None
    c.put("huge", answer(pad=one * 3))
    assert c.get("huge") is None


def test_pipeline_l1_hit_miss_bypass_and_namespaces(fake_rag):  # noqa: F811
    gen = fake_rag.generator
    first = fake_rag.query("Which chunk?")
    again = fake_rag.query("  Which   chunk? ")
    assert (first.cache_tier, again.cache_tier) == ("miss", "l1")
    assert len(gen.prompts) == 1 and again.answer == first.answer
    assert again.timings.cache_l1 > 0 and again.timings.generate == 0
    assert fake_rag.query("Which chunk?", cache_read=False).cache_tier == "miss"
    fake_rag.query("Not stored", cache_write=False)
    assert fake_rag.query("Not stored").cache_tier == "miss"
    assert fake_rag.query("Which chunk?", namespace="tenant-b").cache_tier == "miss"
    assert fake_rag.stats()["cache"]["l1"]["hits"] == 1


def test_pipeline_identical_concurrent_misses_generate_once(fake_rag):  # noqa: F811
    out = fake_rag.query_batch(["same question"] * 32)
    assert all(r.answer == "an answer" for r in out)
    assert len(fake_rag.generator.prompts) == 1
    assert fake_rag.stats()["single_flight"]["shared"] == 31


def test_pipeline_failed_request_writes_nothing(fake_rag):  # noqa: F811
    with pytest.raises(RuntimeError):
        fake_rag.query("poison")
    assert len(fake_rag.cache.l1) == 0


async def test_a_writer_never_shares_a_run_that_does_not_write(fake_rag):  # noqa: F811
    both = await asyncio.gather(fake_rag.aquery("shared?", cache_write=False), fake_rag.aquery("shared?"))
    assert [r.cache_tier for r in both] == ["miss", "miss"]
    assert len(fake_rag.generator.prompts) == 2  # two runs: one writes, one does not
    assert fake_rag.query("shared?").cache_tier == "l1"
    readers = await asyncio.gather(*(fake_rag.aquery("other", cache_write=False) for _ in range(4)))
    assert len(fake_rag.generator.prompts) == 3 and all(r.answer for r in readers)  # non-writers share
    assert fake_rag.query("other").cache_tier == "miss"
