"""Stage spans, rolling per-stage statistics, and gauges.

A ``StageClock`` times the stages of one query with ``time.perf_counter()``; the pipeline
hands the finished spans to ``StageStats``, which keeps the last ``window`` queries and
computes count / mean / p50 / p95 / p99 per stage, and the share of queries each cache tier
answered, only when asked. ``Gauges`` counts what is in flight or queued right now.

**Usage:**

    clock = StageClock()
    with clock.span("embed"):
        vectors = embedder.encode([q])
    clock.ms["embed"]        # milliseconds

    stats = StageStats()
    stats.record(clock.ms, "miss")
    stats.summary()["embed"]["p95_ms"]; stats.tiers()["miss"]["share"]

Stage names are never listed here: they are whatever the pipeline timed (the fields of
``Timings``); ``stage_layout()`` reads which of them are disjoint and which are parts of
another from the field metadata of ``Timings``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

TOTAL = "total"


class _Span:
    __slots__ = ("clock", "stage", "t0")

    def __init__(self, clock: StageClock, stage: str) -> None:
        self.clock, self.stage = clock, stage

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.clock.add(self.stage, (time.perf_counter() - self.t0) * 1e3)


class StageClock:
    """Milliseconds per stage for one request. A stage timed twice accumulates."""

    __slots__ = ("ms", "_start")

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._start = time.perf_counter()

    def span(self, stage: str) -> _Span:
        """``with clock.span("embed"): ...`` adds the block's milliseconds to the stage,
        whether it returns or raises. A class, not a generator-based context manager: it
        times the L1 hit too, where a generator's frames were most of the clock's cost."""
        return _Span(self, stage)

    def add(self, stage: str, ms: float) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + ms

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self._start) * 1e3


def _percentiles(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"count": int(arr.size), "mean_ms": round(float(arr.mean()), 3), "p50_ms": round(float(p50), 3),
            "p95_ms": round(float(p95), 3), "p99_ms": round(float(p99), 3)}


class StageStats:
    """Rolling window over the last ``window`` queries of an engine, shared by all requests.

    ``record`` is one locked deque append (about 1 µs, whatever the number of stages: see
    ``profiling/bench_stats.py``); the per-stage arrays are built only in ``summary``.
    """

    def __init__(self, window: int = 10_000) -> None:
        self.window = window
        self._rows: deque[tuple[str | None, Mapping[str, float]]] = deque(maxlen=window)
        self._tier_counts: dict[str | None, int] = {}
        self._lock = threading.Lock()

    def record(self, stages: Mapping[str, float], tier: str | None = None) -> None:
        """Keep one query's stage times (the mapping must not change afterwards)."""
        with self._lock:
            self._rows.append((tier, stages))
            self._tier_counts[tier] = self._tier_counts.get(tier, 0) + 1

    def _snapshot(self) -> tuple[list[tuple[str | None, Mapping[str, float]]], dict[str | None, int]]:
        with self._lock:
            return list(self._rows), dict(self._tier_counts)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per stage, over the queries in the window that ran it: count, mean/p50/p95/p99 (ms)."""
        rows, _ = self._snapshot()
        per_stage: dict[str, list[float]] = {}
        for _, stages in rows:
            for stage, ms in stages.items():
                per_stage.setdefault(stage, []).append(ms)
        return {stage: _percentiles(values) for stage, values in per_stage.items()}

    def tiers(self) -> dict[str, dict[str, Any]]:
        """Per cache tier that answered (``l1``, ``l2``, ``miss``): queries since start, the
        share of the window it answered (the hit rate of that tier), and its total latency."""
        rows, counts = self._snapshot()
        totals: dict[str | None, list[float]] = {}
        for tier, stages in rows:
            totals.setdefault(tier, []).append(stages.get(TOTAL, 0.0))
        n = len(rows)
        return {str(tier): {"queries": counts.get(tier, 0), "share": round(len(v) / n, 4),
                            "total": _percentiles(v)} for tier, v in totals.items()}

    def on_result(self, result: Any, stages: Mapping[str, float]) -> None:
        """As a request observer (``observe/observers.py``): every answered request is a row."""
        self.record(stages, result.cache_tier)

    def on_error(self, error: BaseException) -> None:
        pass  # failures are counted by ``admission.Requests``; the window holds answers

    @property
    def recorded(self) -> int:
        """Queries recorded since start (the window keeps only the last ``window``)."""
        return sum(self._tier_counts.values())


class Gauges:
    """Named up/down counters (e.g. ``in_flight``, ``queued``) and their peak since start.

    **Usage:** ``g = Gauges("in_flight"); g.inc("in_flight"); ...; g.dec("in_flight")``,
    or ``with g.track("in_flight"): ...``. Safe from any thread (one short lock).
    """

    def __init__(self, *names: str) -> None:
        self._value = dict.fromkeys(names, 0)
        self._peak = dict.fromkeys(names, 0)
        self._lock = threading.Lock()

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            v = self._value[name] = self._value.get(name, 0) + n
            if v > self._peak.get(name, 0):
                self._peak[name] = v

    def dec(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._value[name] = self._value.get(name, 0) - n

    @contextmanager
    def track(self, name: str) -> Iterator[None]:
        self.inc(name)
        try:
            yield
        finally:
            self.dec(name)

    def value(self, name: str) -> int:
        return self._value.get(name, 0)

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {k: {"current": v, "peak": self._peak.get(k, 0)} for k, v in self._value.items()}


def stage_layout(timings_type: type | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """The disjoint stages of ``Timings`` in pipeline order, and the parts of each stage that
    is split further (``{"generate": ["generate_queue", ...]}``), read from field metadata
    (``part_of``), so a stage added to ``Timings`` shows up everywhere without a list to edit.
    """
    if timings_type is None:
        from ragserve.types import Timings as timings_type
    stages: list[str] = []
    parts: dict[str, list[str]] = {}
    for f in dataclasses.fields(timings_type):
        if f.name == TOTAL:
            continue
        parent = f.metadata.get("part_of")
        if parent:
            parts.setdefault(parent, []).append(f.name)
        else:
            stages.append(f.name)
    return stages, parts
