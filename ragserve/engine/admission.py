"""Admission control: a bound on pipeline runs in flight and on runs waiting for a slot;
and every request's deadline and outcome (``Requests``).

Past both bounds a request fails at once with ``OverloadedError``: no unbounded queue,
no memory growth under a burst. Waiters are served by (priority, arrival): the lowest
priority number first (as vLLM's priority scheduler: lower runs earlier), first come,
first served within one priority; a slot freed by a finished run passes straight to the
first of them. A waiter's ``Ticket`` can be promoted while it waits (``promote``): a
single-flight follower with a lower number raises the run it joined.

``reserved`` slots of ``max_in_flight`` are kept for urgent runs (priority number at most
``urgent_priority``): the others start only while more than ``reserved`` slots are free.
Ordering alone cannot keep an urgent request from waiting when a flood of lower-priority
runs holds every slot: vLLM does not preempt a running request to make room, so the urgent
one would wait for a whole answer to finish (``docs/generators.md``). With a slot kept, it
starts at once and joins the engine's running batch.

**Usage:**

    admission = Admission(max_in_flight=64, max_queued=256)
    async with admission.slot(Ticket(priority=0)) as waited:
        ...  # waited() is the ms spent waiting for the slot
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from ragserve.errors import DeadlineExceededError, OverloadedError
from ragserve.observe.observers import Observers
from ragserve.observe.timing import Gauges


class Ticket:
    """A run's place in the admission queue: its priority (lower = sooner), which
    ``Admission.promote`` may lower while it waits, and what it is read for afterwards
    (the priority handed to the generator)."""

    __slots__ = ("priority", "entry")

    def __init__(self, priority: int = 0) -> None:
        self.priority = priority
        self.entry: list[object] | None = None
        """Admission's own: [priority, arrival, future] while the ticket waits in its queue."""


class Admission:
    """Use from one event loop (the engine's)."""

    def __init__(self, max_in_flight: int, max_queued: int, gauges: Gauges | None = None, *,
                 reserved: int = 0, urgent_priority: int = 0) -> None:
        """``gauges``: where the ``queued`` gauge is kept (the engine's), if anywhere;
        ``reserved``: slots only runs of priority <= ``urgent_priority`` may take."""
        if not 0 <= reserved < max_in_flight:
            raise ValueError(f"reserved slots must be in 0..{max_in_flight - 1}, got {reserved}")
        self.max_in_flight = max_in_flight
        self.gauges = gauges
        self.max_queued = max_queued
        self.reserved = reserved
        self.urgent_priority = urgent_priority
        self.in_flight = 0
        self.admitted = 0
        self.rejected = 0
        self.promoted = 0
        # A heap of [priority, arrival, future]; an entry whose future is None was removed
        # (cancelled or promoted: re-pushed) and is skipped when it comes up.
        self._heap: list[list[object]] = []
        self._queued = 0
        self._arrivals = itertools.count()

    @property
    def queued(self) -> int:
        return self._queued

    @asynccontextmanager
    async def slot(self, ticket: Ticket | None = None) -> AsyncIterator[Callable[[], float]]:
        """A run slot, waited for in ``ticket``'s priority (default: priority 0)."""
        t0 = time.perf_counter()
        await self._acquire(ticket or Ticket())
        waited_ms = (time.perf_counter() - t0) * 1e3
        self.admitted += 1
        try:
            yield lambda: waited_ms
        finally:
            self._release()

    def promote(self, ticket: Ticket, priority: int) -> bool:
        """Lower ``ticket``'s priority number to ``priority`` (never raise it). A ticket
        still waiting moves up the queue, keeping its arrival among equals; True if it
        changed."""
        if priority >= ticket.priority:
            return False
        ticket.priority = priority
        self.promoted += 1
        entry = ticket.entry
        if entry is not None and entry[2] is not None:
            moved = [priority, entry[1], entry[2]]
            entry[2] = None  # the old place is skipped when it comes up
            ticket.entry = moved
            heapq.heappush(self._heap, moved)
            self._start_waiters()  # now urgent, it may take a kept slot
        return True

    def _limit(self, priority: object) -> int:
        """How many runs may be in flight for a run of ``priority`` to start."""
        urgent = priority <= self.urgent_priority  # type: ignore[operator]
        return self.max_in_flight if urgent else self.max_in_flight - self.reserved

    def _head(self) -> list[object] | None:
        """The first live waiter's entry (removed ones are dropped on the way)."""
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
        return heap[0] if heap else None

    async def _acquire(self, ticket: Ticket) -> None:
        head = self._head()
        first = head is None or head[0] > ticket.priority  # type: ignore[operator]
        if first and self.in_flight < self._limit(ticket.priority):
            self.in_flight += 1  # nobody of its priority or sooner waits, and a slot is its to take
            return
        if self._queued >= self.max_queued:
            self.rejected += 1
            raise OverloadedError(self.in_flight, self._queued)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket.entry = [ticket.priority, next(self._arrivals), waiter]
        heapq.heappush(self._heap, ticket.entry)
        self._queued += 1
        if self.gauges is not None:
            self.gauges.inc("queued")
        try:
            await waiter  # a releasing run hands its slot over: in_flight stays counted
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot arrived just as we were cancelled: pass it on
            elif ticket.entry is not None and ticket.entry[2] is waiter:  # still queued: leave
                ticket.entry[2] = None
                self._queued -= 1
            raise
        finally:
            ticket.entry = None
            if self.gauges is not None:
                self.gauges.dec("queued")

    def _release(self) -> None:
        self.in_flight -= 1
        self._start_waiters()

    def _start_waiters(self) -> None:
        """Hand free slots to the first waiters while the first may take one (a run below
        the urgent priorities leaves the kept slots free, and so do those behind it)."""
        while (entry := self._head()) is not None and self.in_flight < self._limit(entry[0]):
            heapq.heappop(self._heap)
            waiter = entry[2]
            entry[2] = None  # off the queue: a cancellation landing now must not count it again
            self._queued -= 1
            if not waiter.done():  # type: ignore[attr-defined]
                self.in_flight += 1  # counted for the waiter from here: it owns the slot
                waiter.set_result(None)  # type: ignore[attr-defined]

    def as_dict(self) -> dict[str, int]:
        return {"in_flight": self.in_flight, "queued": self.queued, "max_in_flight": self.max_in_flight,
                "max_queued": self.max_queued, "reserved": self.reserved, "admitted": self.admitted,
                "rejected": self.rejected, "promoted": self.promoted}


class Requests:
    """Every request on the engine loop: its deadline, the ``in_flight`` gauge, and its
    outcome counted (``queries`` is counted by whoever finishes the result)."""

    def __init__(self, gauges: Gauges, observers: Observers | None = None) -> None:
        self.gauges = gauges
        self.observers = observers or Observers()
        self.counts = {"queries": 0, "errors": 0, "timeouts": 0, "cancelled": 0, "partial": 0,
                       "partial_retrievals": 0}
        """``partial``: queries answered without some shards of a sharded index
        (``ray.allow_partial``); ``partial_retrievals``: retrieval-only requests so answered."""
        self._lock = threading.Lock()  # answered() runs on callers' threads (L1 hits) and the engine's

    def answered(self, partial: bool = False) -> None:
        with self._lock:
            self.counts["queries"] += 1
            if partial:
                self.counts["partial"] += 1

    def retrieved_partial(self) -> None:
        with self._lock:
            self.counts["partial_retrievals"] += 1

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
