"""Contract suites: behaviour every implementation of a stage interface shares. A test
class inherits one, gives it a fixture and two small adapters, and pytest runs every
``test_`` method against that implementation (Haystack's store tests work this way).

**Usage:**

    class TestMyTier(CacheTierContract):
        @pytest.fixture
        def tier(self): return MyTier()
        async def get(self, tier, key): return tier.get(key)
        async def put(self, tier, key, value): tier.put(key, value)
"""

from __future__ import annotations

from typing import Any

from ragserve.cache.entries import CachedAnswer, CachedSource


def cached_answer(text: str = "a", question: str = "q", n_sources: int = 1, pad: int = 0) -> CachedAnswer:
    """A small valid cached value (``pad`` characters more of answer, to fill a byte bound)."""
    return CachedAnswer(question=question, answer=text + "x" * pad,
                        sources=[CachedSource("d.txt", i, 0.5, "t", {"k": i}) for i in range(n_sources)],
                        model="m", index_fingerprint="f", prompt_tokens=1, completion_tokens=2,
                        finish_reason="stop", dropped_sources=0, created_at=0.0)


class CacheTierContract:
    """Behaviour every answer tier shares; run on L1 and on a real Redis L2."""

    async def get(self, tier: Any, key: str) -> CachedAnswer | None:
        raise NotImplementedError

    async def put(self, tier: Any, key: str, value: CachedAnswer) -> None:
        raise NotImplementedError

    async def test_miss_then_hit_roundtrip(self, tier):
        assert await self.get(tier, "k1") is None
        await self.put(tier, "k1", cached_answer("hello", n_sources=3))
        got = await self.get(tier, "k1")
        assert got == cached_answer("hello", n_sources=3)
        assert tier.stats.hits == 1 and tier.stats.misses == 1

    async def test_overwrite_and_independent_keys(self, tier):
        await self.put(tier, "a", cached_answer("one"))
        await self.put(tier, "a", cached_answer("two"))
        await self.put(tier, "b", cached_answer("three"))
        assert (await self.get(tier, "a")).answer == "two"
        assert (await self.get(tier, "b")).answer == "three"
