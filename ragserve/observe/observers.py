"""Request observers: who hears about every finished or failed request.

The pipeline tells its observers once per request, after the request's own total is
stamped: ``on_result`` with the result and the stage times it actually ran, ``on_error``
with the error that ended it. The rolling ``stats()`` (``timing.StageStats``), the
Prometheus exporter of ``ragserve serve`` and the profiler each subscribe; none of them
parses ``stats()`` or reaches into the pipeline's private state (the Haystack tracer
pattern).

An observer runs on whatever thread finished the request (the caller's for an L1 hit,
the engine loop's otherwise), so it must be quick and thread-safe. An observer that
raises is logged and skipped: watching a request never fails it.

**Usage:**

    class Printer:
        def on_result(self, result, stages): print(result.cache_tier, stages["total"])
        def on_error(self, error): print(type(error).__name__)

    rag.observers.add(Printer())
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ragserve.types import QueryResult, SpanRef

log = logging.getLogger("ragserve")


class RequestObserver(Protocol):
    def on_result(self, result: QueryResult, stages: Mapping[str, float]) -> None:
        """A request answered: ``stages`` holds the ms of each stage it ran, and ``total``."""
        ...

    def on_error(self, error: BaseException) -> None:
        """A request failed, timed out or was cancelled (``asyncio.CancelledError``)."""
        ...


class Observers:
    """The observers of one engine; ``add`` / ``remove`` from any thread."""

    def __init__(self, *observers: RequestObserver) -> None:
        self._observers: tuple[RequestObserver, ...] = observers

    def add(self, observer: RequestObserver) -> None:
        # A new tuple, never a mutated one: a notification in progress keeps its snapshot.
        self._observers = (*self._observers, observer)

    def remove(self, observer: RequestObserver) -> None:
        self._observers = tuple(o for o in self._observers if o is not observer)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._observers)

    def result(self, result: QueryResult, stages: Mapping[str, float]) -> None:
        for o in self._observers:
            try:
                o.on_result(result, stages)
            except Exception:  # noqa: BLE001 - an observer's bug must not fail the request
                log.exception("observer %r failed on a result", o)

    def generation(self, result: QueryResult) -> SpanRef | None:
        """A run of the miss path generated ``result`` (once, however many requests share
        it): for observers with an ``on_generation`` (token counters). Returns the first
        ``SpanRef`` an ``on_generation`` returned: the span tracing gives the generation
        (``traces.Tracing``), kept with the answer as ``result.origin_span``; else None."""
        origin = None
        for o in self._observers:
            hook = getattr(o, "on_generation", None)
            if hook is None:
                continue
            try:
                named = hook(result)
            except Exception:  # noqa: BLE001
                log.exception("observer %r failed on a generation", o)
                continue
            if origin is None:
                origin = named
        return origin

    def error(self, error: BaseException) -> None:
        for o in self._observers:
            try:
                o.on_error(error)
            except Exception:  # noqa: BLE001
                log.exception("observer %r failed on an error", o)
