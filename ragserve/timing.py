"""Stage spans and rolling per-stage statistics.

A ``StageClock`` times the stages of one query with ``time.perf_counter()``; the pipeline
hands the finished spans to ``StageStats``, which keeps a rolling window per stage and
computes count / mean / p50 / p95 / p99 only when asked (recording is an append).

**Usage:**

    clock = StageClock()
    with clock.span("embed"):
        vectors = embedder.encode([q])
    clock.ms["embed"]        # milliseconds
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np


class StageClock:
    """Milliseconds per stage for one request. A stage timed twice accumulates."""

    __slots__ = ("ms", "_start")

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def span(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, (time.perf_counter() - t0) * 1e3)

    def add(self, stage: str, ms: float) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + ms

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self._start) * 1e3


class StageStats:
    """Rolling window of per-stage milliseconds, shared by all requests of an engine."""

    def __init__(self, window: int = 10_000) -> None:
        self._window = window
        self._samples: dict[str, deque[float]] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def record(self, stages: Mapping[str, float]) -> None:
        with self._lock:
            for stage, ms in stages.items():
                q = self._samples.get(stage)
                if q is None:
                    q = self._samples[stage] = deque(maxlen=self._window)
                q.append(ms)
                self._counts[stage] = self._counts.get(stage, 0) + 1

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per stage: total count, and mean/p50/p95/p99 (ms) over the window."""
        with self._lock:
            snapshot = {s: (self._counts[s], np.fromiter(q, float)) for s, q in self._samples.items()}
        out: dict[str, dict[str, Any]] = {}
        for stage, (count, arr) in snapshot.items():
            p50, p95, p99 = np.percentile(arr, [50, 95, 99]) if arr.size else (0.0, 0.0, 0.0)
            out[stage] = {
                "count": count,
                "window": int(arr.size),
                "mean_ms": round(float(arr.mean()), 3) if arr.size else 0.0,
                "p50_ms": round(float(p50), 3),
                "p95_ms": round(float(p95), 3),
                "p99_ms": round(float(p99), 3),
            }
        return out
