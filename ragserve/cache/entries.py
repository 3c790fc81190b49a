"""The value a cache tier stores for one key, its codec, and a tier's counters.

Values are ``CachedAnswer`` structs encoded as JSON with msgspec, which also validates the
schema on the way back: a value that does not decode is a miss, never an exception and
never code execution (no pickle).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ragserve.types import SpanRef


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
    origin: SpanRef | None = None
    """The span that generated the answer (traced where it was generated), for a hit's
    trace to link to; never part of a key. Absent in a record written without it (by an
    older ragserve, or untraced): no link. Older readers ignore it."""


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
