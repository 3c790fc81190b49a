"""Answer cache: keys, the stored value and its codec, and the in-process L1.

Keys are SHA-256 over a canonical encoding of the normalised question (NFKC, whitespace
collapsed and trimmed), the index fingerprint, the answer-changing config fingerprint
(generation model, sampling, prompt template version, top_k, the index's query-time search
settings) and the namespace. Python's ``hash()`` is never used: keys must agree across
processes and restarts.

Values are ``CachedAnswer`` structs encoded as JSON with msgspec, which also validates the
schema on the way back: a value that does not decode is a miss, never an exception and
never code execution (no pickle).
"""

from __future__ import annotations

import hashlib
import threading
import time
import unicodedata
from collections import OrderedDict
from typing import Any

import msgspec

from ragserve.errors import InvalidParameterError

KEY_VERSION = "k1"


def normalize_question(question: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", question).split())


def cache_key(question: str, *, index_fingerprint: str, answer_fingerprint: str, namespace: str) -> str:
    """SHA-256 hex of everything that decides the answer. ``question`` must be normalised.

    Text that is not Unicode (a lone surrogate) cannot be encoded into a key: that is an
    ``InvalidTextError`` naming the question or the namespace, never a ``UnicodeEncodeError``.
    """
    if not isinstance(namespace, str):
        raise InvalidParameterError("namespace", namespace, "a str")
    try:
        canonical = msgspec.json.encode([KEY_VERSION, question, index_fingerprint, answer_fingerprint, namespace])
    except UnicodeEncodeError:
        from ragserve.validation import check_unicode  # validation imports this module

        check_unicode(question, "question")
        check_unicode(namespace, "namespace")
        raise
    return hashlib.sha256(canonical).hexdigest()


class CachedSource(msgspec.Struct, frozen=True):
    doc_id: str
    chunk_id: int
    score: float
    text: str
    metadata: dict[str, Any]


class CachedAnswer(msgspec.Struct, frozen=True):
    """What a cache tier stores for one key."""

    question: str
    answer: str
    sources: list[CachedSource]
    model: str
    index_fingerprint: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    dropped_sources: int
    created_at: float


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CachedAnswer)


def encode_answer(value: CachedAnswer) -> bytes:
    return _encoder.encode(value)


def decode_answer(data: bytes) -> CachedAnswer:
    """Raises ``msgspec.DecodeError`` (or ``ValidationError``) for anything but a valid value."""
    return _decoder.decode(data)


class TierStats:
    """Counters of one tier; plain ints under the GIL (reads may lag by one update)."""

    __slots__ = ("hits", "misses", "errors", "writes", "evictions", "expired", "skipped")

    def __init__(self) -> None:
        self.hits = self.misses = self.errors = self.writes = self.evictions = self.expired = self.skipped = 0

    def as_dict(self) -> dict[str, float]:
        lookups = self.hits + self.misses
        d = {k: getattr(self, k) for k in self.__slots__}
        d["hit_rate"] = round(self.hits / lookups, 4) if lookups else 0.0
        return d


class L1Cache:
    """In-process LRU with a TTL, bounded by entry count and by total encoded bytes.

    One lock guards the map; every operation is a few dict moves, so it is safe to call
    from threads and from the event loop without blocking either for long.
    """

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 64 << 20, ttl_s: float = 3600.0) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.stats = TierStats()
        self._data: OrderedDict[str, tuple[CachedAnswer, float, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str, *, count_miss: bool = True) -> CachedAnswer | None:
        """``count_miss=False``: a second look for a key whose miss is already counted."""
        now = time.monotonic()
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.stats.misses += count_miss
                return None
            value, expires, size = item
            if expires <= now:
                del self._data[key]
                self._bytes -= size
                self.stats.expired += 1
                self.stats.misses += count_miss
                return None
            self._data.move_to_end(key)
            self.stats.hits += 1
            return value

    def put(self, key: str, value: CachedAnswer, size: int | None = None) -> None:
        if self.max_entries <= 0:
            return
        size = size if size is not None else len(encode_answer(value))
        if size > self.max_bytes:
            return  # larger than the whole cache: storing it would evict everything
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            self._data[key] = (value, time.monotonic() + self.ttl_s, size)
            self._bytes += size
            self.stats.writes += 1
            while len(self._data) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, _, evicted) = self._data.popitem(last=False)
                self._bytes -= evicted
                self.stats.evictions += 1

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[2]

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0
