"""The main job: index CPython's help topics and answer three questions about Python.

Run with ``make demo`` (which installs what is needed first). A second run reuses the
corpus folder and the verified index, and says so.

The answers, their sources and timings are what it prints; what vLLM, torch, Triton and the
model loaders write (warnings, progress bars, the engine core's messages) goes to
``build/demo.log``. ``--verbose`` shows all of that here instead, as it comes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from pydoc_corpus import write_corpus  # noqa: E402

from ragserve import RAG, DoneEvent, RAGConfig, RagserveError, TokenEvent, build_index, verify_index  # noqa: E402
from ragserve.cli.console import print_result  # noqa: E402
from ragserve.cli.quiet import quiet  # noqa: E402

CORPUS = ROOT / "build" / "corpus" / "pydoc-topics"
INDEX = ROOT / "indexes" / "pydoc"
LOG = ROOT / "build" / "demo.log"
QUESTIONS = [
    "How does the with statement work?",
    "What does a yield expression do in a function?",
    "How do I handle an exception with try and except?",
]
MORE = [
    "What does the global statement do?", "How is a class definition executed?",
    "What does the assert statement do?", "How does a for loop iterate?",
    "What is a lambda expression?", "What does the del statement do?",
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true",
                        help="print the libraries' and the engine's messages here instead of to build/demo.log")
    args = parser.parse_args()
    with quiet(LOG, verbose=args.verbose, name="demo") as q:
        if q.log:
            print(f"logs: {q.log} (vLLM, torch and model-loading messages; --verbose shows them here)")
        demo()


def demo() -> None:
    ensure_index()
    t = time.perf_counter()
    config = RAGConfig.load()
    if not config.cache.redis_url:  # no Redis of the user's: ragserve starts its own
        config = config.replace(cache={"redis_url": "embedded"})
    with RAG.from_index(INDEX, config) as rag:
        print(f"engine: ready in {time.perf_counter() - t:.1f} s (model {rag.generator.model_name}; "
              f"L2 cache {rag.cache.l2.url})\n")
        print(f"Q: {QUESTIONS[0]}  (streamed as it is generated)\nA: ", end="", flush=True)
        for event in rag.stream(QUESTIONS[0]):
            if isinstance(event, TokenEvent):
                print(event.text, end="", flush=True)
            elif isinstance(event, DoneEvent):
                t = event.result.timings
                print(f"\n   (first token after {t.generate_first_token:.0f} ms in vLLM; whole answer in {t.total:.0f} ms)\n")
        for q in QUESTIONS[1:]:
            print_result(rag.query(q))
            print()
        print(f"== {len(MORE)} more questions at once: one engine, shared embedding batches, vLLM batching")
        t = time.perf_counter()
        results = rag.query_batch(MORE)
        wall = time.perf_counter() - t
        for r in results:
            print(f"   {r.question}\n      → {r}" if not isinstance(r, Exception) else f"   failed: {r}")
        tokens = sum(r.usage.completion_tokens for r in results if not isinstance(r, Exception))
        print(f"   {len(MORE)} answers in {wall:.1f} s ({len(MORE) / wall:.2f} answers/s, {tokens / wall:.0f} tokens/s); "
              f"mean embedding batch {rag.stats()['embed_batches']['mean_batch']}\n")
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
