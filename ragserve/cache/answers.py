"""The answer cache as the pipeline uses it: L1 → L2 lookup, backfill, writes, stats.

Conversions between ``QueryResult`` and the stored ``CachedAnswer`` live here too, so the
pipeline only asks "is there an answer for this key" and "remember this one".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ragserve.cache.entries import CachedAnswer, CachedSource, encode_answer
from ragserve.cache.keys import cache_key
from ragserve.cache.l1 import L1Cache
from ragserve.cache.l2 import RedisL2
from ragserve.cache.redis_server import RedisServer
from ragserve.config import CacheConfig
from ragserve.observe.timing import StageClock
from ragserve.types import CacheTier, Generation, QueryResult, Source, Timings, TokenUsage


class AnswerCache:
    def __init__(self, config: CacheConfig, answer_fingerprint: str) -> None:
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

    def key(self, normalized_question: str, namespace: str | None, index_fingerprint: str,
            top_k: int | None = None) -> str:
        """``index_fingerprint``: of the index version the request reads (a reload changes
        it, so no answer from the old index is ever served); ``top_k``: a request's own,
        when it differs from the config's."""
        answer = self.answer_fingerprint if top_k is None else f"{self.answer_fingerprint}:top_k={top_k}"
        return cache_key(normalized_question, index_fingerprint=index_fingerprint, answer_fingerprint=answer,
                         namespace=self.config.namespace if namespace is None else namespace)

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
                "l2": self.l2.as_dict() if self.l2 else None}

    async def close(self) -> None:
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
        dropped_sources=r.dropped_sources, created_at=time.time(),
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


def from_cached(v: CachedAnswer, tier: CacheTier, clock: StageClock) -> QueryResult:
    return QueryResult(
        question=v.question, answer=v.answer,
        sources=[Source(s.doc_id, s.chunk_id, s.score, s.text, s.metadata) for s in v.sources],
        timings=Timings(**clock.ms), cache_tier=tier, model=v.model, index_fingerprint=v.index_fingerprint,
        usage=TokenUsage(v.prompt_tokens, v.completion_tokens), finish_reason=v.finish_reason,
        dropped_sources=v.dropped_sources,
    )
