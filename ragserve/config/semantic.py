"""``[semantic]``: the opt-in semantic answer tier (reuse the answer of a cached question
that means the same), its threshold and its guard.

**Usage** (what ``ragserve calibrate-semantic --write ragserve.toml`` writes)::

    [semantic]
    enabled = true
    threshold = 0.93          # cosine similarity; from calibration, never a guess
    guard = "strict"
    calibrated_model = "all-MiniLM-L6-v2"

A threshold is only meaningful for the embedding model it was calibrated with: the tier
refuses to start when ``calibrated_model`` names another model than the index's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ragserve.errors import ConfigError

GuardMode = Literal["off", "entities", "strict"]


@dataclass(frozen=True)
class SemanticConfig:
    enabled: bool = False
    """Off by default: turn it on with a threshold calibrated for the index's model."""
    threshold: float = 0.0
    """Cosine similarity (the embedder's unit vectors' dot product) a cached question must
    reach. 0.0 means "not calibrated": enabling the tier with it is a ``ConfigError`` (a 0
    is never read as "any similarity")."""
    guard: GuardMode = "strict"
    """What else must agree besides similarity: "off"; "entities" (negation, numbers and
    named entities); "strict" (also the content words, up to light stemming)."""
    max_entries: int = 100_000
    """Vectors kept per partition (namespace × index × answer fingerprint); the oldest go first."""
    max_partitions: int = 64
    """Partitions kept in process (least recently used go first; Redis keeps theirs)."""
    sync_interval_ms: float = 200.0
    """How often a partition reads entries other processes added to Redis (at most once per
    interval, inside a lookup, under L2's timeout and breaker)."""
    calibrated_model: str = ""
    """The embedding model the threshold was calibrated for ("" : not recorded)."""
    alpha: float = 0.0
    """Recorded by calibration: the false-hit rate the threshold was certified for."""
    delta: float = 0.0
    """Recorded by calibration: 1 - delta is the confidence of that certificate."""


def validate_semantic(s: SemanticConfig) -> None:
    allowed = get_args(GuardMode)
    if s.guard not in allowed:
        raise ConfigError("semantic.guard", f"must be one of {', '.join(map(repr, allowed))}, got {s.guard!r}")
    if not 0.0 <= s.threshold <= 1.0:
        raise ConfigError("semantic.threshold", f"must be in [0, 1] (cosine similarity), got {s.threshold}")
    if s.enabled and s.threshold <= 0.0:
        raise ConfigError("semantic.threshold", "is 0 (not calibrated): run `ragserve calibrate-semantic` "
                          "and use the threshold it certifies, or set one in (0, 1]")
    if s.max_entries < 1:
        raise ConfigError("semantic.max_entries", f"must be >= 1, got {s.max_entries}")
    if s.max_partitions < 1:
        raise ConfigError("semantic.max_partitions", f"must be >= 1, got {s.max_partitions}")
    if s.sync_interval_ms < 0:
        raise ConfigError("semantic.sync_interval_ms", f"must be >= 0, got {s.sync_interval_ms}")
    for name in ("alpha", "delta"):
        v = getattr(s, name)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"semantic.{name}", f"must be in [0, 1), got {v}")
