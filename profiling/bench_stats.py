"""Micro-benchmark: what recording one query's statistics costs (``StageStats.record`` with
every ``Timings`` stage, the gauges' inc/dec), and what ``rag.stats()``'s summary costs
with a full window. Prints hardware and versions first; a benchmark, not a test.

Usage: python profiling/bench_stats.py [--calls 200000] [--window 10000]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from ragserve.observe.timing import Gauges, StageClock, StageStats  # noqa: E402
from ragserve.types import Timings  # noqa: E402


def per_call_us(fn, calls: int, repeats: int = 5) -> tuple[float, float]:
    """Best and median of ``repeats`` runs, µs per call (the best is the least disturbed)."""
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t) / calls * 1e6)
    return min(runs), float(np.median(runs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--window", type=int, default=10_000)
    args = ap.parse_args()
    miss = {f.name: 1.5 for f in dataclasses.fields(Timings)}  # every stage, as a miss has
    hit = {"cache_l1": 0.002, "total": 0.02}
    stats = StageStats(window=args.window)
    gauges = Gauges("in_flight", "queued")

    def gauge_pair() -> None:
        gauges.inc("in_flight")
        gauges.dec("in_flight")

    def noop() -> None:
        pass

    rows = [
        ("StageStats.record, miss (%d stages)" % len(miss), lambda: stats.record(miss, "miss")),
        ("StageStats.record, L1 hit (2 stages)", lambda: stats.record(hit, "l1")),
        ("Gauges inc + dec", gauge_pair),
        ("StageClock() (for scale)", StageClock),
        ("empty call (loop overhead, for scale)", noop),
    ]
    print(f"# stats recording cost — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, numpy {np.__version__}; load avg {os.getloadavg()[0]:.1f}")
    print(f"# {args.calls} calls per run, best and median of 5 runs\n")
    print("| what | best µs/call | median µs/call |\n|---|--:|--:|")
    for name, fn in rows:
        best, med = per_call_us(fn, args.calls)
        print(f"| {name} | {best:.3f} | {med:.3f} |")
    for _ in range(args.window):
        stats.record(miss, "miss")
    t = time.perf_counter()
    stats.summary()
    stats.tiers()
    print(f"\nsummary() + tiers() over a full window of {args.window} queries: "
          f"{(time.perf_counter() - t) * 1e3:.1f} ms (paid by whoever calls rag.stats(), not by queries)")


if __name__ == "__main__":
    main()
