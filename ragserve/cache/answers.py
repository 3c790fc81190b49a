"""The answer cache as the pipeline uses it: L1 → L2 lookup, backfill, writes, stats.

Conversions between ``QueryResult`` and the stored ``CachedAnswer`` live here too, so the
pipeline only asks "is there an answer for this key" and "remember this one".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ragserve.cache.entries import CachedAnswer, CachedSource, encode_answer
from ragserve.cache.keys import cache_key, partition_key
from ragserve.cache.l1 import L1Cache
from ragserve.cache.l2 import RedisL2
from ragserve.cache.redis_server import RedisServer
from ragserve.cache.semantic import SemanticCache, SemanticMatch
from ragserve.config import CacheConfig, SemanticConfig
from ragserve.observe.timing import StageClock
from ragserve.types import CacheTier, Generation, QueryResult, Source, Timings, TokenUsage


class AnswerCache:
    def __init__(self, config: CacheConfig, answer_fingerprint: str, semantic: SemanticConfig | None = None) -> None:
        self.config = config
        self.answer_fingerprint = answer_fingerprint
        self.l1 = L1Cache(config.l1_max_entries, config.l1_max_bytes, config.l1_ttl_s)
        self.server: RedisServer | None = None
        url = config.redis_url
        if url == "embedded":
            folder = Path(config.redis_dir) if config.redis_dir else None
            self.server = RedisServer(folder=folder, persist=folder is not None).start()
            url = self.server.url
        self.l2 = (
            RedisL2(url, ttl_s=config.l2_ttl_s, timeout_s=config.l2_timeout_ms / 1000,
                    failures_to_open=config.l2_failures_to_open, cooldown_s=config.l2_cooldown_s)
            if url else None
        )
        self.semantic = (SemanticCache(semantic, self.l2, config.l2_ttl_s)
                         if semantic is not None and semantic.enabled else None)
        """The semantic tier (``semantic.py``), or None when ``[semantic]`` is off."""

    def key(self, normalized_question: str, namespace: str | None, index_fingerprint: str,
            top_k: int | None = None, answer_fingerprint: str | None = None) -> str:
        """``index_fingerprint``: of the index version the request reads (a reload changes
        it, so no answer from the old index is ever served); ``top_k``: a request's own,
        when it differs from the config's; ``answer_fingerprint``: the request's model's,
        when ``[models]`` names several (default: the config's)."""
        return cache_key(normalized_question, index_fingerprint=index_fingerprint,
                         answer_fingerprint=self._answer(top_k, answer_fingerprint),
                         namespace=self._namespace(namespace))

    def partition(self, namespace: str | None, index_fingerprint: str, top_k: int | None = None,
                  answer_fingerprint: str | None = None) -> str:
        """The semantic tier's partition for the same factors as ``key``, but the question."""
        return partition_key(index_fingerprint=index_fingerprint,
                             answer_fingerprint=self._answer(top_k, answer_fingerprint),
                             namespace=self._namespace(namespace))

    def _answer(self, top_k: int | None, answer_fingerprint: str | None = None) -> str:
        fingerprint = answer_fingerprint or self.answer_fingerprint
        return fingerprint if top_k is None else f"{fingerprint}:top_k={top_k}"

    def _namespace(self, namespace: str | None) -> str:
        return self.config.namespace if namespace is None else namespace

    async def lookup_semantic(self, partition: str, vector: Any, question: str,
                              clock: StageClock) -> tuple[CachedAnswer, SemanticMatch] | None:
        """The semantic tier's match and its answer (from L1, else L2), or None. A match
        whose answer has left both tiers is dropped and is a miss."""
        if self.semantic is None:
            return None
        with clock.span("cache_semantic"):
            match = await self.semantic.lookup(partition, vector, question)
            if match is None:
                return None
            value = self.l1.peek(match.key)
            if value is None and self.l2 is not None:
                value = await self.l2.get(match.key, count=False)
                if value is not None:
                    self.l1.put(match.key, value)
        if value is None:
            self.semantic.answer_gone(partition, match)
            return None
        self.semantic.served(match)
        return value, match

    def remember_vector(self, partition: str, key: str, question: str, vector: Any) -> None:
        """After ``remember``: the question's vector, so later questions that mean the same
        can find its answer (a no-op when the semantic tier is off)."""
        if self.semantic is not None and vector is not None:
            self.semantic.remember(partition, key, question, vector)

    async def lookup(self, key: str, clock: StageClock, *, l1: bool = True) -> tuple[CachedAnswer | None, CacheTier]:
        """L1, then L2 (an L2 hit is copied into L1). ``l1=False`` when the caller has
        just looked there itself (the sync fast path), so a miss is counted once."""
        if l1:
            with clock.span("cache_l1"):
                hit = self.l1.get(key)
            if hit is not None:
                return hit, "l1"
        if self.l2 is not None:
            with clock.span("cache_l2"):
                hit = await self.l2.get(key)
            if hit is not None:
                self.l1.put(key, hit)  # backfill
                return hit, "l2"
        return None, "miss"

    def remember(self, key: str, result: QueryResult) -> None:
        """Write to L1 now and to L2 in the background (call on the engine loop)."""
        value = to_cached(result)
        self.l1.put(key, value, len(encode_answer(value)))
        if self.l2 is not None:
            self.l2.put_later(key, value)

    def stats(self) -> dict[str, Any]:
        return {"l1": {**self.l1.stats.as_dict(), "entries": len(self.l1), "bytes": self.l1.bytes},
                "l2": self.l2.as_dict() if self.l2 else None,
                "semantic": self.semantic.as_dict() if self.semantic else None}

    async def close(self) -> None:
        if self.semantic is not None:
            await self.semantic.close()
        if self.l2 is not None:
            await self.l2.close()

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def to_cached(r: QueryResult) -> CachedAnswer:
    return CachedAnswer(
        question=r.question, answer=r.answer,
        sources=[CachedSource(s.doc_id, s.chunk_id, s.score, s.text, s.metadata) for s in r.sources],
        model=r.model, index_fingerprint=r.index_fingerprint, prompt_tokens=r.usage.prompt_tokens,
        completion_tokens=r.usage.completion_tokens, finish_reason=r.finish_reason,
        dropped_sources=r.dropped_sources, created_at=time.time(), origin=r.origin_span,
    )


def from_generation(question: str, model: str, prompt: Any, gen: Generation, clock: StageClock,
                    index_fingerprint: str) -> QueryResult:
    """A miss's result: the answer, the sources its prompt used, vLLM's own split of
    the generate stage (queue, first token, decode)."""
    clock.add("generate_queue", gen.queue_ms)
    clock.add("generate_first_token", gen.first_token_ms)
    clock.add("generate_decode", gen.decode_ms)
    return QueryResult(
        question=question, answer=gen.text, sources=prompt.used, timings=Timings(**clock.ms), cache_tier="miss",
        model=model, index_fingerprint=index_fingerprint, usage=gen.usage, finish_reason=gen.finish_reason,
        dropped_sources=prompt.dropped,
    )


_UNSTAMPED = Timings()


def from_cached(v: CachedAnswer, tier: CacheTier) -> QueryResult:
    """A hit's result. Its ``timings`` are the request's, which only its end knows: the
    pipeline stamps them (``Pipeline._finish``) before anyone sees the result."""
    return QueryResult(
        question=v.question, answer=v.answer,
        sources=[Source(s.doc_id, s.chunk_id, s.score, s.text, s.metadata) for s in v.sources],
        timings=_UNSTAMPED, cache_tier=tier, model=v.model, index_fingerprint=v.index_fingerprint,
        usage=TokenUsage(v.prompt_tokens, v.completion_tokens), finish_reason=v.finish_reason,
        dropped_sources=v.dropped_sources, origin_span=v.origin,
    )
