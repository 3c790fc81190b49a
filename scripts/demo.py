"""The main job: index CPython's help topics and answer three questions about Python.

Run with ``make demo`` (which installs what is needed first). A second run reuses the
corpus folder and the verified index, and says so.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from pydoc_corpus import write_corpus  # noqa: E402

from ragserve import RAG, RAGConfig, RagserveError, build_index, verify_index  # noqa: E402
from ragserve.cli import print_result  # noqa: E402

CORPUS = ROOT / "build" / "corpus" / "pydoc-topics"
INDEX = ROOT / "indexes" / "pydoc"
QUESTIONS = [
    "How does the with statement work?",
    "What does a yield expression do in a function?",
    "How do I handle an exception with try and except?",
]


def ensure_index() -> None:
    n, written = write_corpus(CORPUS)
    print(f"corpus: {n} CPython help topics {'written to' if written else 'reused from'} {CORPUS}")
    if not written:
        try:
            m = verify_index(INDEX)
            print(f"index: reusing {INDEX} ({m.data['counts']['chunks']} chunks, verified against its manifest)")
            return
        except RagserveError as e:
            print(f"index: rebuilding ({e})")
    t = time.perf_counter()
    report = build_index(CORPUS, INDEX)
    mib = 1024 * 1024
    print(f"index: built {INDEX} in {time.perf_counter() - t:.1f} s — {report.files_read} files, "
          f"{report.chunks} chunks, {report.index_type} {report.index_bytes / mib:.2f} MiB "
          f"(fp32 would be {report.fp32_bytes / mib:.2f} MiB), {len(report.skipped)} skipped")


def main() -> None:
    ensure_index()
    t = time.perf_counter()
    config = RAGConfig.load()
    if not config.cache.redis_url:  # no Redis of the user's: ragserve starts its own
        config = config.replace(cache={"redis_url": "embedded"})
    with RAG.from_index(INDEX, config) as rag:
        print(f"engine: ready in {time.perf_counter() - t:.1f} s (model {rag.generator.model_name}; "
              f"L2 cache {rag.cache.l2.url})\n")
        for q in QUESTIONS:
            print_result(rag.query(q))
            print()
        print("== the same questions again: answered from the in-process cache (L1)")
        for q in QUESTIONS:
            r = rag.query(q)
            print(f"   [{r.cache_tier}] {r.timings.total * 1000:.0f} µs  {q}")
        rag.cache.l1.clear()  # as a new process would start: L1 empty, Redis still warm
        print("== and once more with L1 emptied: answered from Redis (L2)")
        for q in QUESTIONS:
            r = rag.query(q)
            print(f"   [{r.cache_tier}] {r.timings.total:.2f} ms  {q}")
        stats = rag.stats()
        print("\nper-stage p50 over the demo (ms): "
              + ", ".join(f"{k} {v['p50_ms']:.2f}" for k, v in stats["stages"].items()))
        hit_rates = {tier: stats["cache"][tier]["hit_rate"] for tier in ("l1", "l2")}
        print(f"cache hit rate by tier: {hit_rates}")


if __name__ == "__main__":
    main()
