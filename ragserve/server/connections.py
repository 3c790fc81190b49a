"""The connections of one server, all together: how many may be open (``max_connections``,
fitted to the process's descriptor limit), which are idle and so may be closed to make
room, the reserve kept for probes, and every refusal counted by reason (logged at most once
a minute). What one connection may hold, and the protocol that enforces it, is
``limits.py``; it asks the guard here on every connection and request.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import Counter
from typing import Any

from ragserve.config import ServerConfig

log = logging.getLogger("ragserve.server")
LOG_EVERY_S = 60.0
"""Refusals are logged as counts, at most once a minute: an attack must not flood the log."""
SPARE_DESCRIPTORS = 256
"""Descriptors kept beside ``max_connections`` for files, Redis, the engine, logs."""
REASONS = ("headers_too_large", "header_timeout", "body_timeout", "invalid_request", "idle_closed", "evicted",
           "refused_full", "refused_busy", "send_timeout")
"""Why a limit refused or ended a connection: the ``reason`` label of
``ragserve_http_refusals_total``, never anything the client sent."""


class ConnectionGuard:
    """The connections of one server: how many are open, which have no request in
    progress (``idle``, oldest first: the ones closed to make room), and what was refused
    (``counts``, by reason)."""

    def __init__(self, s: ServerConfig, max_connections: int) -> None:
        self.s = s
        self.max_connections = max_connections
        self.live: set[Any] = set()
        self.idle: dict[Any, None] = {}  # insertion-ordered: the oldest first
        self.counts: Counter[str] = Counter()
        self._window: Counter[str] = Counter()
        self._logged = 0.0

    def admit(self, conn: Any) -> bool:
        if len(self.live) >= self.max_connections:
            victim = next(iter(self.idle), None)
            if victim is None:
                self.note("refused_full")
                return False
            self.note("evicted")
            victim.close_now()
        self.live.add(conn)
        self.idle[conn] = None
        return True

    def busy(self, conn: Any) -> bool:
        """``conn`` starts a request: False if only the probes' reserve is left."""
        self.idle.pop(conn, None)
        return len(self.live) - len(self.idle) <= self.max_connections - self.s.ops_connections

    def rest(self, conn: Any) -> None:
        if conn in self.live:
            self.idle[conn] = None

    def forget(self, conn: Any) -> None:
        self.live.discard(conn)
        self.idle.pop(conn, None)

    def note(self, reason: str) -> None:
        """Count a refusal; at most once a minute, a warning with the counts since the last."""
        assert reason in REASONS, reason
        self.counts[reason] += 1
        self._window[reason] += 1
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY_S:
            summary = ", ".join(f"{n} {r}" for r, n in sorted(self._window.items()))
            log.warning("connection limits (server.*) since the last report: %s", summary)
            self._window.clear()
            self._logged = now


def fit_descriptors(wanted: int) -> int:
    """``wanted`` connections, the process's descriptor limit raised to fit them (up to its
    hard limit); if it cannot be, as many as fit, with a warning."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        fit = max(2, soft - SPARE_DESCRIPTORS)
        log.warning("server.max_connections=%d does not fit the descriptor limit (%d; hard %d): using %d",
                    wanted, soft, hard, fit)
        return fit
    return wanted
