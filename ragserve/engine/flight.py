"""Single-flight over event streams: identical concurrent misses share one run.

The first request for a key starts the run as a task; every request for the same key
while it runs subscribes to it and is replayed the run's events from the first one, then
follows it live. A non-streaming request reads the same events and keeps the last, so
streaming and non-streaming requests share runs too (one miss path).

Ownership: the run belongs to nobody in particular. A subscriber that leaves (cancelled,
past its deadline, a client gone) only unsubscribes; the run is cancelled when its last
subscriber leaves, so a follower never inherits a cancellation that was not its own, and
an abandoned run does not keep generating. A run that fails hands the same error to every
subscriber: they asked the same question of the same engine.

**Usage:**

    flight = StreamFlight()
    async for event in flight.subscribe(key, lambda: produce_events()):
        ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Run(Generic[T]):
    """One shared run: the events so far, and whether (and how) it ended."""

    def __init__(self, stream: AsyncIterator[T]) -> None:
        self.events: list[T] = []
        self.error: BaseException | None = None
        self.finished = False
        self.subscribers = 0
        self.context: object = None
        self._wake = asyncio.Event()
        self.task = asyncio.ensure_future(self._pump(stream))

    async def _pump(self, stream: AsyncIterator[T]) -> None:
        try:
            async for event in stream:
                self.events.append(event)
                self._notify()
        except asyncio.CancelledError as e:
            self.error = e
            raise
        except Exception as e:  # noqa: BLE001 - handed to every subscriber by replay()
            self.error = e
        finally:
            self.finished = True
            self._notify()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    async def replay(self) -> AsyncIterator[T]:
        i = 0
        while True:
            while i < len(self.events):
                yield self.events[i]
                i += 1
            wake = self._wake  # taken before the checks: no await between them and the wait
            if self.finished:
                if self.error is not None:
                    raise self.error
                return
            await wake.wait()


class StreamFlight:
    """Identical concurrent event streams share one run (see the module docstring).

    Use from one event loop (the engine's). ``runs`` counts the runs started, ``shared``
    the subscriptions that joined a run someone else started.
    """

    def __init__(self) -> None:
        self._runs: dict[str, _Run[object]] = {}
        self.runs = 0
        self.shared = 0

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, key: str) -> bool:
        """A run for ``key`` is going and may be joined."""
        run = self._runs.get(key)
        return run is not None and run.error is None

    def context(self, key: str) -> object:
        """What the running run for ``key`` was started with (``subscribe(context=...)``), if
        one is going and may be joined; else None."""
        return self._runs[key].context if key in self else None

    async def subscribe(self, key: str, factory: Callable[[], AsyncIterator[T]],
                        context: object = None) -> AsyncIterator[T]:
        """``context``: kept with a run this call starts (the pipeline keeps its admission
        ticket there, for followers to raise)."""
        run = self._runs.get(key)
        if run is None or run.error is not None:  # a failed run is not joined: start afresh
            run = self._start(key, factory())
            run.context = context
        else:
            self.shared += 1
        run.subscribers += 1
        try:
            async for event in run.replay():
                yield event  # type: ignore[misc]
        finally:
            run.subscribers -= 1
            if run.subscribers == 0 and not run.task.done():
                # Nobody waits for it any more. Forget it first: a request arriving before
                # the cancellation lands must start its own run, not join a dying one.
                self._forget(key, run)
                run.task.cancel()

    def _start(self, key: str, stream: AsyncIterator[T]) -> _Run[object]:
        run: _Run[object] = _Run(stream)  # type: ignore[arg-type]
        self._runs[key] = run
        self.runs += 1

        run.task.add_done_callback(lambda _: self._forget(key, run))
        return run

    def _forget(self, key: str, run: _Run[object]) -> None:
        if self._runs.get(key) is run:
            del self._runs[key]
