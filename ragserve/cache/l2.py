"""L2 answer cache on Redis (redis-py's asyncio client), built never to fail a query.

- Tight timeouts (tens of ms) and no retries: measured here, redis-py's defaults waited
  3.9 s on a killed Redis and 59.5 s on a hung one for one GET. Each call is also bounded
  by ``asyncio.wait_for`` so a stopped server cannot hold a query past the timeout.
- A circuit breaker: after ``failures_to_open`` consecutive errors L2 is skipped for
  ``cooldown_s``; then one background PING probes the server, and a success closes the
  breaker, so L2 comes back by itself after a restart. The probe never runs inside a
  query: on a hung server it would add the whole timeout to that query's latency.
- Connection errors, timeouts, OOM replies and undecodable values are counted and treated
  as a miss; an undecodable value is deleted.
- Writes run as background tasks, off the query's critical path.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from ragserve.cache.entries import CachedAnswer, TierStats, decode_answer, encode_answer

KEY_PREFIX = "ragserve:v1:answer:"


class CircuitBreaker:
    def __init__(self, failures_to_open: int = 3, cooldown_s: float = 1.0) -> None:
        self.failures_to_open = failures_to_open
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        """May a query's call go to Redis now? Only while closed."""
        return self.opened_at is None

    def should_probe(self) -> bool:
        """True once per cooldown: the caller then owns the one probe in flight."""
        if self.state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._probing = False

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.opened_at is not None or self.failures >= self.failures_to_open:
            self.opened_at = time.monotonic()


class RedisL2:
    """**Usage:** ``l2 = RedisL2("redis://127.0.0.1:6379/0"); await l2.get(key)``"""

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 86_400.0,
        timeout_s: float = 0.05,
        failures_to_open: int = 3,
        cooldown_s: float = 1.0,
    ) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.stats = TierStats()
        self.breaker = CircuitBreaker(failures_to_open, cooldown_s)
        self._client: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_error: str = ""

    def _redis(self) -> Any:
        if self._client is None:
            import redis.asyncio as aioredis

            self._client = aioredis.from_url(
                self.url,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                retry_on_timeout=False,
                retry=None,
                health_check_interval=0,
            )
        return self._client

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One Redis command under the breaker and a hard deadline; raises on failure."""
        return await asyncio.wait_for(getattr(self._redis(), method)(*args, **kwargs), self.timeout_s)

    def _available(self) -> bool:
        """Closed breaker: go ahead. Open: skip, and start the background probe when due."""
        if self.breaker.allow():
            return True
        if self.breaker.should_probe():
            self._background(self._probe())
        self.stats.skipped += 1
        return False

    async def _probe(self) -> None:
        try:
            await self._call("ping")
        except Exception as e:  # noqa: BLE001 - still down: the breaker stays open
            self._failed(e)
        else:
            self.breaker.success()

    async def get(self, key: str, *, count: bool = True) -> CachedAnswer | None:
        """``count=False``: a look for another tier (the semantic tier fetching the answer
        of the question it matched), not counted as an L2 hit or miss."""
        if not self._available():
            self.stats.misses += count
            return None
        try:
            data = await self._call("get", KEY_PREFIX + key)
        except Exception as e:  # noqa: BLE001 - every Redis failure is a counted miss
            self._failed(e)
            self.stats.misses += count
            return None
        self.breaker.success()
        if data is None:
            self.stats.misses += count
            return None
        try:
            value = decode_answer(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.stats.errors += 1
            self.stats.misses += count
            self.last_error = f"undecodable value under {key[:12]}: {e}"
            self._background(self._delete(key))
            return None
        self.stats.hits += count
        return value

    async def command(self, method: str, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        """One Redis command for a tier that shares this connection, timeout and breaker
        (the semantic tier's streams): ``(True, reply)``, or ``(False, None)`` when Redis
        is skipped or failed (counted here like L2's own calls)."""
        if not self._available():
            return False, None
        try:
            reply = await self._call(method, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - as for get: a failure is never raised
            self._failed(e)
            return False, None
        self.breaker.success()
        return True, reply

    def commands_later(self, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> None:
        """``(method, args, kwargs)`` commands in order, each sent after the last one's reply,
        in one background task (two background tasks may reach Redis in either order)."""

        async def run() -> None:
            for method, args, kwargs in calls:
                await self.command(method, *args, **kwargs)

        self._background(run())

    def put_later(self, key: str, value: CachedAnswer) -> None:
        """Schedule a write on the running loop; the caller does not wait for it."""
        self._background(self.put(key, value))

    async def put(self, key: str, value: CachedAnswer) -> bool:
        if not self._available():
            return False
        try:
            await self._call("set", KEY_PREFIX + key, encode_answer(value), px=int(self.ttl_s * 1000))
        except Exception as e:  # noqa: BLE001 - OOM replies, timeouts, refused connections
            self._failed(e)
            return False
        self.breaker.success()
        self.stats.writes += 1
        return True

    async def _delete(self, key: str) -> None:
        try:
            await self._call("delete", KEY_PREFIX + key)
        except Exception as e:  # noqa: BLE001
            self._failed(e)

    def _failed(self, e: BaseException) -> None:
        self.stats.errors += 1
        self.last_error = f"{type(e).__name__}: {e}"
        self.breaker.failure()
        if self.breaker.state != "closed" and self._client is not None:
            # Drop pooled sockets of a dead server so the probe opens a fresh connection.
            client, self._client = self._client, None
            self._background(_close_quietly(client))

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def tasks(self) -> set[asyncio.Task[None]]:
        """Background writes, deletes and probes still running."""
        return self._tasks

    async def drain(self) -> None:
        """Wait for background writes (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        if self._client is not None:
            client, self._client = self._client, None
            await _close_quietly(client)

    def as_dict(self) -> dict[str, Any]:
        return {**self.stats.as_dict(), "breaker": self.breaker.state, "last_error": self.last_error}


async def _close_quietly(client: Any) -> None:
    try:
        await asyncio.wait_for(client.aclose(), 1.0)
    except Exception:  # noqa: BLE001 - closing a dead connection may fail in many ways
        pass
