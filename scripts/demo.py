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

from ragserve import RAG, RagserveError, build_index, verify_index  # noqa: E402
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
    with RAG.from_index(INDEX) as rag:
        print(f"engine: ready in {time.perf_counter() - t:.1f} s (model {rag.generator.model_name})\n")
        for q in QUESTIONS:
            print_result(rag.query(q))
            print()
        stages = rag.stats()["stages"]
        print("per-stage p50 over the demo (ms): "
              + ", ".join(f"{k} {v['p50_ms']:.1f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
