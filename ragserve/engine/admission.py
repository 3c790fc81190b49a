"""Admission control: a bound on pipeline runs in flight and on runs waiting for a slot;
and every request's deadline and outcome (``Requests``).

Past both bounds a request fails at once with ``OverloadedError``: no unbounded queue,
no memory growth under a burst. Waiters are served first come, first served; a slot
freed by a finished run passes straight to the oldest waiter.

**Usage:**

    admission = Admission(max_in_flight=64, max_queued=256)
    async with admission.slot() as waited:
        ...  # waited() is the ms spent waiting for the slot
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from ragserve.errors import DeadlineExceededError, OverloadedError
from ragserve.observe.observers import Observers
from ragserve.observe.timing import Gauges


class Admission:
    """Use from one event loop (the engine's)."""

    def __init__(self, max_in_flight: int, max_queued: int, gauges: Gauges | None = None) -> None:
        """``gauges``: where the ``queued`` gauge is kept (the engine's), if anywhere."""
        self.max_in_flight = max_in_flight
        self.gauges = gauges
        self.max_queued = max_queued
        self.in_flight = 0
        self.admitted = 0
        self.rejected = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Callable[[], float]]:
        t0 = time.perf_counter()
        await self._acquire()
        waited_ms = (time.perf_counter() - t0) * 1e3
        self.admitted += 1
        try:
            yield lambda: waited_ms
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.max_queued:
            self.rejected += 1
            raise OverloadedError(self.in_flight, len(self._waiters))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self.gauges is not None:
            self.gauges.inc("queued")
        try:
            await waiter  # a releasing run hands its slot over: in_flight stays counted
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot arrived just as we were cancelled: pass it on
            elif waiter in self._waiters:  # a release in the same loop turn may have popped it already
                self._waiters.remove(waiter)
            raise
        finally:
            if self.gauges is not None:
                self.gauges.dec("queued")

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1

    def as_dict(self) -> dict[str, int]:
        return {"in_flight": self.in_flight, "queued": self.queued, "max_in_flight": self.max_in_flight,
                "max_queued": self.max_queued, "admitted": self.admitted, "rejected": self.rejected}


class Requests:
    """Every request on the engine loop: its deadline, the ``in_flight`` gauge, and its
    outcome counted (``queries`` is counted by whoever finishes the result)."""

    def __init__(self, gauges: Gauges, observers: Observers | None = None) -> None:
        self.gauges = gauges
        self.observers = observers or Observers()
        self.counts = {"queries": 0, "errors": 0, "timeouts": 0, "cancelled": 0}
        self._lock = threading.Lock()  # answered() runs on callers' threads (L1 hits) and the engine's

    def answered(self) -> None:
        with self._lock:
            self.counts["queries"] += 1

    def refused(self, error: BaseException) -> None:
        """A request refused before it started (bad input): counted and reported as one."""
        self.counts["errors"] += 1
        self.observers.error(error)

    @asynccontextmanager
    async def scope(self, deadline_s: float) -> AsyncIterator[None]:
        """One request; past ``deadline_s`` (0: none) it is cancelled and raises
        ``DeadlineExceededError`` — cancellation is what aborts its vLLM request."""
        self.gauges.inc("in_flight")
        try:
            try:
                async with deadline(deadline_s):
                    yield
            except DeadlineExceededError:
                self.counts["timeouts"] += 1
                raise
        except GeneratorExit:
            self.counts["cancelled"] += 1  # a stream left early: not a failure to report
            raise
        except asyncio.CancelledError as e:
            self.counts["cancelled"] += 1
            self.observers.error(e)
            raise
        except BaseException as e:
            self.counts["errors"] += 1
            self.observers.error(e)
            raise
        finally:
            self.gauges.dec("in_flight")


@asynccontextmanager
async def deadline(deadline_s: float) -> AsyncIterator[None]:
    """The block, cancelled past ``deadline_s`` (0: none) with ``DeadlineExceededError``."""
    try:
        async with asyncio.timeout(deadline_s or None) as scope:
            yield
    except TimeoutError:
        if scope.expired():  # ours, not a TimeoutError from inside the block
            raise DeadlineExceededError(deadline_s) from None
        raise
