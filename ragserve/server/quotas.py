"""Per-tenant quotas: a token bucket per API key name, checked at the server's edge before
the engine sees the request.

Two buckets per tenant (``tenants.Quota``; 0 is no limit):

- **requests**: ``requests_per_s`` refill, ``burst`` capacity; every request admitted takes
  one, cache hits included.
- **tokens**: ``tokens_per_min`` refill, one minute's worth of capacity; a request is
  admitted while the bucket holds at least one token, and the tokens a generation produced
  are taken when it ends (``charge``), so the bucket may go below zero and the tenant then
  waits until it has paid the debt back. L1/L2 hits generate nothing and cost nothing
  here; a request that shared another's run (single-flight) is charged the tokens it got.

A refusal is ``QuotaExceeded`` (HTTP 429) whose ``retry_after_s`` is when the empty bucket
holds one unit again: a client that waits that long is admitted, unless it spent the
refill meanwhile. Refusals are counted per tenant name and bucket (``/metrics``:
``ragserve_quota_refusals_total{tenant, bucket}``; names come from the keys file only).

Where the buckets live: in this process (``server.quota_redis_url = ""``), or in Redis,
so that every replica of ``serve --ray`` draws on one bucket per tenant. One Lua script
checks both buckets and takes a request in one atomic step, on Redis's clock (``TIME``):
two replicas cannot both take the last unit. Redis is never allowed to fail a request:
tight timeouts, no retries, a circuit breaker (``cache/l2.py``'s); while it cannot answer,
requests are admitted (fail open) and counted (``ragserve_quota_fail_open_total``), and
the breaker probes it again after ``cache.l2_cooldown_s``.

**Usage:** ``quotas = Quotas(keys.tenants, QuotaStore.local()); await quotas.admit(tenant)``
then ``await quotas.charge(tenant, result)``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ragserve.cache.l2 import CircuitBreaker
from ragserve.errors import QuotaExceeded
from ragserve.server.tenants import Quota, Tenant

log = logging.getLogger("ragserve.server")
KEY_PREFIX = "ragserve:v1:quota:"
BUCKETS = ("requests", "tokens")


def refill(level: float | None, at: float, now: float, rate: float, capacity: float) -> float:
    """A bucket's level at ``now``: full when never used, else refilled at ``rate``/s up to
    ``capacity`` since ``at`` (a clock going back refills nothing)."""
    if level is None:
        return capacity
    return min(capacity, level + max(0.0, now - at) * rate)


class Buckets:
    """The in-process store: ``{(name, bucket): (level, at)}``, on a monotonic clock. Used
    from one event loop (the server's): each call runs without an await inside."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._state: dict[tuple[str, str], tuple[float, float]] = {}

    async def admit(self, name: str, quota: Quota) -> tuple[str, float] | None:
        """Take one request, if both buckets allow it; else (bucket, seconds until it
        would)."""
        now = self.clock()
        if quota.tokens_per_min > 0:
            rate = quota.tokens_per_min / 60
            tokens = refill(*self._get(name, "tokens"), now, rate, quota.tokens_per_min)
            if tokens < 1:
                return "tokens", (1 - tokens) / rate
        if quota.requests_per_s > 0:
            level = refill(*self._get(name, "requests"), now, quota.requests_per_s, quota.burst)
            if level < 1:
                return "requests", (1 - level) / quota.requests_per_s
            self._state[(name, "requests")] = (level - 1, now)
        return None

    async def charge(self, name: str, quota: Quota, tokens: int) -> None:
        now = self.clock()
        rate = quota.tokens_per_min / 60
        level = refill(*self._get(name, "tokens"), now, rate, quota.tokens_per_min)
        self._state[(name, "tokens")] = (level - tokens, now)

    def _get(self, name: str, bucket: str) -> tuple[float | None, float]:
        return self._state.get((name, bucket), (None, 0.0))

    async def close(self) -> None:
        pass


# KEYS: the requests bucket, the tokens bucket. ARGV: requests_per_s, burst, tokens/s,
# tokens capacity. Levels are returned as strings: Redis truncates Lua numbers to integers.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, rate, cap)
  local v = redis.call('HMGET', key, 'level', 'at')
  if not v[1] then return cap end
  return math.min(cap, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * rate)
end
local rrate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local trate, tcap = tonumber(ARGV[3]), tonumber(ARGV[4])
if trate > 0 then
  local tokens = level(KEYS[2], trate, tcap)
  if tokens < 1 then return {'tokens', tostring((1 - tokens) / trate)} end
end
if rrate > 0 then
  local l = level(KEYS[1], rrate, burst)
  if l < 1 then return {'requests', tostring((1 - l) / rrate)} end
  redis.call('HSET', KEYS[1], 'level', tostring(l - 1), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rrate * 1000) + 1000)
end
return {'', '0'}
"""

# KEYS: the tokens bucket. ARGV: tokens/s, capacity, tokens generated.
_CHARGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'level', 'at')
local l = cap
if v[1] then l = math.min(cap, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * rate) end
l = l - tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'level', tostring(l), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((cap - l) / rate * 1000) + 1000)
return tostring(l)
"""


class RedisBuckets:
    """The shared store: both scripts run atomically in Redis, on its clock. Each call is
    bounded by ``timeout_s`` and raises on any failure (``Quotas`` fails open)."""

    def __init__(self, url: str, timeout_s: float = 0.05) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client: Any = None
        self._scripts: dict[str, Any] = {}

    def _script(self, name: str, source: str) -> Any:
        if self._client is None:
            import redis.asyncio as aioredis

            # NOTE: the same settings as L2 (cache/l2.py): redis-py's defaults wait seconds
            # on a dead server and retry, which a request at the edge must never do.
            self._client = aioredis.from_url(self.url, socket_timeout=self.timeout_s,
                                             socket_connect_timeout=self.timeout_s, retry_on_timeout=False,
                                             retry=None, health_check_interval=0)
        if name not in self._scripts:
            self._scripts[name] = self._client.register_script(source)
        return self._scripts[name]

    async def admit(self, name: str, quota: Quota) -> tuple[str, float] | None:
        keys = [f"{KEY_PREFIX}{name}:requests", f"{KEY_PREFIX}{name}:tokens"]
        args = [quota.requests_per_s, quota.burst, quota.tokens_per_min / 60, quota.tokens_per_min]
        script = self._script("admit", _ADMIT)
        bucket, wait = await asyncio.wait_for(script(keys=keys, args=args), self.timeout_s)
        bucket = bucket.decode() if isinstance(bucket, bytes) else bucket
        return (bucket, float(wait)) if bucket else None

    async def charge(self, name: str, quota: Quota, tokens: int) -> None:
        script = self._script("charge", _CHARGE)
        args = [quota.tokens_per_min / 60, quota.tokens_per_min, tokens]
        await asyncio.wait_for(script(keys=[f"{KEY_PREFIX}{name}:tokens"], args=args), self.timeout_s)

    async def close(self) -> None:
        client, self._client, self._scripts = self._client, None, {}
        if client is not None:
            try:
                await asyncio.wait_for(client.aclose(), 1.0)
            except Exception:  # noqa: BLE001 - closing a dead connection may fail in many ways
                pass


class Store(Protocol):
    async def admit(self, name: str, quota: Quota) -> tuple[str, float] | None: ...
    async def charge(self, name: str, quota: Quota, tokens: int) -> None: ...
    async def close(self) -> None: ...


class Quotas:
    """The tenants' buckets in a store, refusals counted, Redis failures failing open."""

    def __init__(self, tenants: list[Tenant], store: Store, breaker: CircuitBreaker | None = None) -> None:
        self.tenants = tenants
        self.store = store
        self.breaker = breaker or CircuitBreaker()
        self.refusals = {(t.name, b): 0 for t in tenants if t.quota.limited for b in BUCKETS}
        self.admitted = 0
        self.fail_open = 0
        """Requests admitted, and charges dropped, because the store could not answer."""

    async def admit(self, tenant: Tenant | None) -> None:
        """Take one request from ``tenant``'s bucket, or raise ``QuotaExceeded``."""
        if tenant is None or not tenant.quota.limited:
            return
        refused = await self._guarded(self.store.admit(tenant.name, tenant.quota))
        if refused:
            bucket, wait = refused
            self.refusals[(tenant.name, bucket)] = self.refusals.get((tenant.name, bucket), 0) + 1
            raise QuotaExceeded(tenant.name, bucket, wait)
        self.admitted += 1

    async def charge(self, tenant: Tenant | None, result: Any) -> None:
        """Take the tokens ``result`` generated (none for a cache hit)."""
        if tenant is None or tenant.quota.tokens_per_min <= 0 or result.cache_tier != "miss":
            return
        tokens = result.usage.completion_tokens
        if tokens > 0:
            await self._guarded(self.store.charge(tenant.name, tenant.quota, tokens))

    async def _guarded(self, call: Any) -> Any:
        if not (self.breaker.allow() or self.breaker.should_probe()):
            call.close()  # never awaited: the store is skipped while the breaker is open
            self.fail_open += 1
            return None
        try:
            out = await call
        except Exception as e:  # noqa: BLE001 - a quota store must never fail a request
            self.breaker.failure()
            self.fail_open += 1
            log.warning("quota store failed (%s: %s): admitting the request (fail open)", type(e).__name__, e)
            return None
        self.breaker.success()
        return out

    async def close(self) -> None:
        await self.store.close()


def make_quotas(tenants: list[Tenant], redis_url: str, timeout_ms: float, failures_to_open: int,
                cooldown_s: float) -> Quotas | None:
    """None when no tenant has a quota; else buckets in Redis (``redis_url``) or here."""
    if not any(t.quota.limited for t in tenants):
        return None
    store: Store = RedisBuckets(redis_url, timeout_ms / 1e3) if redis_url else Buckets()
    return Quotas(tenants, store, CircuitBreaker(failures_to_open, cooldown_s))


class QuotaMetrics(Collector):
    """``ragserve_quota_refusals_total{tenant, bucket}`` and ``ragserve_quota_fail_open_total``,
    read at scrape time."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas

    def collect(self) -> Iterator[CounterMetricFamily]:
        refusals = CounterMetricFamily("ragserve_quota_refusals", "Refused by the key's quota (429)",
                                       labels=["tenant", "bucket"])
        for (name, bucket), n in sorted(self.quotas.refusals.items()):
            refusals.add_metric([name, bucket], n)
        yield refusals
        yield CounterMetricFamily("ragserve_quota_fail_open",
                                  "Quota checks skipped because the quota store (Redis) did not answer",
                                  value=self.quotas.fail_open)
