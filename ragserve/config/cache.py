"""``[cache]``: the answer tiers (L1 in process, L2 in Redis) and their bounds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    """Answer caching as a whole; a request can also bypass reads or writes."""
    namespace: str = "default"
    """Tenant part of every key: two namespaces never see each other's answers."""
    l1_max_entries: int = 10_000
    """L1 (in-process LRU) bound by entries; 0 turns L1 off."""
    l1_max_bytes: int = 64 * 1024 * 1024
    """L1 bound by the encoded size of its values."""
    l1_ttl_s: float = 3600.0
    redis_url: str = ""
    """L2: "" (off), "embedded" (ragserve starts its own Redis on a unix socket), or a
    redis://, rediss:// or unix:// URL. Also from RAGSERVE_REDIS_URL. ``ragserve serve``
    turns "" into "embedded" with ``redis_dir`` set: a service has L2 by default."""
    redis_dir: str = ""
    """Where an embedded Redis keeps its data (RDB + append-only file), so answers survive
    a restart; "" keeps nothing (the data dies with the process). ``ragserve serve``
    defaults it to ``$RAGSERVE_HOME/redis``."""
    l2_ttl_s: float = 86_400.0
    l2_timeout_ms: float = 50.0
    """Each Redis call gives up after this long; a cache outage must not stall a query."""
    l2_failures_to_open: int = 3
    """Consecutive L2 errors that open the circuit breaker."""
    l2_cooldown_s: float = 1.0
    """How long an open breaker skips Redis before one background probe tries again."""
