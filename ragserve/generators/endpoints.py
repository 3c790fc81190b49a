"""The servers of a remote generator: least-outstanding routing, ejection, probing back in.

A request goes to the healthy endpoint with the fewest requests outstanding (ties: the
one picked least recently, so an idle pool still spreads its requests). An endpoint that
fails ``failures_to_eject`` times in a row (connection refused or timed out, a 5xx, a
stream cut before its first token) is ejected: it gets no requests until a background
probe finds it healthy again, every ``probe_interval_s``. A success resets the count.

Everything here runs on one event loop (the engine loop); the counters are read from
other threads (``stats()``, ``/health``) as plain ints and bools.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("ragserve.generate")

Probe = Callable[["Endpoint"], Awaitable[bool]]


@dataclass(eq=False)
class Endpoint:
    """One server and its counters (identity, not value, tells two endpoints apart)."""

    url: str
    outstanding: int = 0
    """Requests sent to it and not finished."""
    requests: int = 0
    """Requests ever sent to it (attempts: a retried request counts on each endpoint)."""
    failures: int = 0
    """Consecutive failures; a success resets it."""
    errors: int = 0
    """Failures ever counted."""
    ejected: bool = False
    ejections: int = 0
    picked: int = 0
    """When it was last picked (a pick counter): ties go to the one picked longest ago."""

    def as_dict(self) -> dict[str, object]:
        return {"url": shown_url(self.url), "outstanding": self.outstanding, "requests": self.requests,
                "failures": self.failures, "errors": self.errors, "ejected": self.ejected,
                "ejections": self.ejections}


class Endpoints:
    """**Usage:** ``ep = pool.pick(); pool.begin(ep); ...; pool.success(ep) / pool.failure(ep);
    pool.end(ep)``. ``probe(ep)`` answers whether an ejected endpoint is healthy again."""

    def __init__(self, urls: Iterable[str], failures_to_eject: int, probe_interval_s: float,
                 probe: Probe) -> None:
        self.all = [Endpoint(u) for u in urls]
        self.failures_to_eject = failures_to_eject
        self.probe_interval_s = probe_interval_s
        self._probe = probe
        self._picks = itertools.count(1)
        self._prober: asyncio.Task[None] | None = None

    def healthy(self) -> list[Endpoint]:
        return [e for e in self.all if not e.ejected]

    def pick(self, exclude: Iterable[Endpoint] = ()) -> Endpoint | None:
        """The healthy endpoint with the fewest outstanding requests, not in ``exclude``;
        None when there is none."""
        skip = set(map(id, exclude))
        candidates = [e for e in self.all if not e.ejected and id(e) not in skip]
        if not candidates:
            return None
        best = min(candidates, key=lambda e: (e.outstanding, e.picked))
        best.picked = next(self._picks)
        return best

    def begin(self, ep: Endpoint) -> None:
        ep.outstanding += 1
        ep.requests += 1

    def end(self, ep: Endpoint) -> None:
        ep.outstanding -= 1

    def success(self, ep: Endpoint) -> None:
        ep.failures = 0

    def failure(self, ep: Endpoint, reason: str) -> None:
        """Count a failure; the ``failures_to_eject``-th in a row ejects the endpoint and
        starts the prober (on the running loop)."""
        ep.failures += 1
        ep.errors += 1
        if ep.ejected or ep.failures < self.failures_to_eject:
            log.info("generator endpoint %s failed (%d in a row): %s", shown_url(ep.url), ep.failures, reason)
            return
        ep.ejected = True
        ep.ejections += 1
        log.warning("generator endpoint %s ejected after %d failures in a row (last: %s); "
                    "probing it every %g s", shown_url(ep.url), ep.failures, reason, self.probe_interval_s)
        if self._prober is None or self._prober.done():
            loop = asyncio.get_running_loop()
            self._prober = loop.create_task(self._probe_ejected(), name="ragserve-probe")

    def restore(self, ep: Endpoint) -> None:
        ep.ejected = False
        ep.failures = 0
        log.warning("generator endpoint %s is healthy again", shown_url(ep.url))

    async def _probe_ejected(self) -> None:
        """Probe the ejected endpoints until none is left; a probe that raises is a no."""
        while any(e.ejected for e in self.all):
            await asyncio.sleep(self.probe_interval_s)
            for ep in [e for e in self.all if e.ejected]:
                try:
                    healthy = await self._probe(ep)
                except Exception as e:  # noqa: BLE001 - any failure of a probe means "not yet"
                    log.debug("probe of %s failed: %s", shown_url(ep.url), e)
                    healthy = False
                if healthy:
                    self.restore(ep)

    async def stop(self) -> None:
        """Stop probing (idempotent)."""
        task, self._prober = self._prober, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def stop_soon(self) -> None:
        """``stop`` for code that cannot await (a sync ``shutdown``)."""
        if self._prober is not None:
            self._prober.cancel()
            self._prober = None

    def outstanding(self) -> int:
        return sum(e.outstanding for e in self.all)

    def stats(self) -> list[dict[str, object]]:
        return [e.as_dict() for e in self.all]


def shown_url(url: str) -> str:
    """A URL without its user:password part, for logs and stats."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}{sep}{netloc.rsplit('@', 1)[-1]}{slash}{path}"
