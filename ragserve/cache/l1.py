"""The in-process answer tier: an LRU with a TTL, bounded by entries and bytes."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from ragserve.cache.entries import CachedAnswer, TierStats, encode_answer


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

    def peek(self, key: str) -> CachedAnswer | None:
        """The value under ``key`` if live, not counted as a hit or miss of L1 (the semantic
        tier fetching the answer of the question it matched); a served value is recent use."""
        with self._lock:
            item = self._data.get(key)
            if item is None or item[1] <= time.monotonic():
                return None
            self._data.move_to_end(key)
            return item[0]

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
