"""When the client tries a request again, and for how long: ``Retries``, and the
``Retry-After`` header read as seconds.

A refusal that says "later" (429, or 503 from a server that is draining, restarting or
has no generator) and a connection that fails before the answer is complete are tried
again: after the server's ``Retry-After`` when it sends one (never sooner), else after an
exponential backoff, each wait stretched by a random jitter so clients refused together do
not come back together. ``max_attempts`` and ``deadline_s`` bound it: the last error is
raised once either would be passed (a ``Retry-After`` beyond the deadline gives up at once
instead of sleeping into it).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from ragserve.errors import ConfigError

RETRY_STATUSES = frozenset({429, 503})
"""Refusals that mean "not now": every other 4xx and 5xx is final."""


@dataclass(frozen=True)
class Retries:
    """How ``Client`` and ``AsyncClient`` try again.

    **Usage:** ``Client(url, retries=Retries(max_attempts=6, deadline_s=120))``;
    ``Retries(max_attempts=1)`` never tries again.
    """

    max_attempts: int = 4
    """Attempts in all, the first one included."""
    deadline_s: float = 30.0
    """No attempt starts later than this after the first one started."""
    backoff_s: float = 0.25
    """The first wait without a ``Retry-After``; it doubles with each attempt."""
    max_backoff_s: float = 4.0
    """The longest backoff (a server's ``Retry-After`` may ask for longer: it is honoured)."""
    jitter: float = 0.2
    """Each wait is stretched by a random 0..jitter of itself (never shortened)."""

    def __post_init__(self) -> None:
        for name, ok, expected in (("max_attempts", self.max_attempts >= 1, ">= 1"),
                                   ("deadline_s", self.deadline_s >= 0, ">= 0"),
                                   ("backoff_s", self.backoff_s >= 0, ">= 0"),
                                   ("max_backoff_s", self.max_backoff_s >= 0, ">= 0"),
                                   ("jitter", 0 <= self.jitter <= 1, "between 0 and 1")):
            if not ok:
                raise ConfigError(f"Retries.{name}", f"must be {expected}, got {getattr(self, name)!r}")

    def wait_s(self, attempt: int, retry_after_s: float | None,
               rng: Callable[[], float] = random.random) -> float:
        """The wait after failed attempt number ``attempt`` (1 for the first)."""
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        if retry_after_s is not None:
            base = max(base, retry_after_s)
        return base * (1 + self.jitter * rng())

    def next_wait_s(self, attempt: int, retry_after_s: float | None, elapsed_s: float) -> float | None:
        """The wait before the next attempt, or None when the bound says give up."""
        if attempt >= self.max_attempts:
            return None
        wait = self.wait_s(attempt, retry_after_s)
        return wait if elapsed_s + wait <= self.deadline_s else None


def retry_after_s(header: str | None, now: Callable[[], float] = time.time) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3); None
    when absent or not understood."""
    if header is None:
        return None
    value = header.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now())
