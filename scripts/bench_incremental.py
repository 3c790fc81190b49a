"""Incremental build benchmark: a full build against an incremental one after 1% of the
files changed, on a generated corpus (default about 20,000 chunks).

The corpus is XQuAD's English paragraphs repeated with variations (each file holds a few
paragraphs and a line that makes it unique), written to a temporary folder. Steps, in
one process with one loaded embedding model:

1. full build of the corpus;
2. 1% of the files (seeded) get a sentence appended;
3. ``--dry-run``'s plan (hashing every file);
4. incremental build: only the changed files are embedded;
5. full build of the changed folder (``full=True``), the reference the incremental
   build must equal: the top-10 of XQuAD's questions are compared between the two.

Prints a markdown table with hardware and versions at the top. A benchmark, not a test:
on a shared machine read times as rough and compare the rows of one run.

Usage:
    python scripts/bench_incremental.py --chunks 2000            # quick check
    python scripts/bench_incremental.py --out reports/bench_incremental.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragserve.profiling.env import environment, machine_line, versions_line  # noqa: E402

XQUAD = ROOT.parent / "shared" / "data" / "xquad-en" / "xquad.en.json"
PARAGRAPHS_PER_FILE = 4


def paragraphs() -> tuple[list[str], list[str]]:
    data = json.loads(XQUAD.read_text("utf-8"))["data"]
    paras = [p["context"] for a in data for p in a["paragraphs"]]
    questions = [qa["question"] for a in data for p in a["paragraphs"] for qa in p["qas"]]
    return paras, questions


def write_corpus(folder: Path, n_files: int, paras: list[str], seed: int) -> None:
    """``n_files`` files of a few paragraphs each, every file different from the others."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        picks = rng.choice(len(paras), PARAGRAPHS_PER_FILE, replace=False)
        text = f"Collection {k}, volume {k % 97}.\n\n" + "\n\n".join(paras[i] for i in picks)
        (folder / f"part{k // 1000:03d}" / f"doc{k:06d}.txt").parent.mkdir(exist_ok=True)
        (folder / f"part{k // 1000:03d}" / f"doc{k:06d}.txt").write_text(text, encoding="utf-8")


def chunks_per_file(paras: list[str], embedder, config, seed: int) -> float:
    """The splitter's chunks per generated file, measured on a sample of files."""
    from ragserve.ingest import Document, chunk_documents

    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp), 50, paras, seed)
        docs = [Document(p.name, p.read_text("utf-8")) for p in sorted(Path(tmp).rglob("*.txt"))]
        n = sum(1 for _ in chunk_documents(docs, config.chunk.chunk_size, config.chunk.chunk_overlap,
                                           embedder.token_counter()))
    return n / 50


def change_files(folder: Path, share: float, seed: int) -> int:
    files = sorted(folder.rglob("*.txt"))
    rng = np.random.default_rng(seed + 1)
    picked = rng.choice(len(files), max(1, round(share * len(files))), replace=False)
    for i in picked:
        path = files[i]
        path.write_text(path.read_text("utf-8") + f"\n\nRevised in edition {seed + 2}: one more sentence.",
                        encoding="utf-8")
    return len(picked)


def top10_agreement(a: Path, b: Path, queries: np.ndarray, tie: float = 2e-3) -> tuple[float, float]:
    """Share of queries with the same top-10 ids in the same order; and the same up to
    swaps among hits whose scores tie within ``tie`` (the corpus repeats paragraphs, so
    equal texts embedded in different batches differ by bf16 noise and swap places)."""
    from ragserve.index import FaissIndex
    from ragserve.index_spec import IndexSpec
    from ragserve.manifest import verify

    def load(p: Path) -> FaissIndex:
        m = verify(p)
        return FaissIndex.load(m.folder, IndexSpec.from_manifest(m.data["index"]))

    ha, hb = load(a).search(queries, 10), load(b).search(queries, 10)
    exact = [[h.chunk_id for h in x] == [h.chunk_id for h in y] for x, y in zip(ha, hb)]

    def up_to_ties(x: list, y: list) -> bool:
        if any(abs(p.score - q.score) > tie for p, q in zip(x, y)):
            return False
        differ = {h.chunk_id for h in x} ^ {h.chunk_id for h in y}
        return all(abs(h.score - x[-1].score) <= tie for h in x + y if h.chunk_id in differ)

    return float(np.mean(exact)), float(np.mean([up_to_ties(x, y) for x, y in zip(ha, hb)]))


def row(name: str, report, seconds: float, full_s: float | None) -> str:
    s = report.seconds
    ratio = f"{full_s / seconds:.1f}×" if full_s else "1.0×"
    return (f"| {name} | {report.mode} | {report.files_read:,} | {report.chunks:,} | {report.embedded:,} "
            f"| {seconds:.2f} | {s.get('embed', 0):.2f} | {s.get('index', 0):.2f} "
            f"| {s.get('scan', 0) + s.get('read', 0):.2f} | {s.get('write', 0):.2f} | {ratio} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=20_000, help="About this many chunks in the corpus.")
    ap.add_argument("--changed", type=float, default=0.01, help="Share of files changed before the rebuild.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="Folder for corpus and indexes (default: a temp dir).")
    ap.add_argument("--out", type=Path, default=None, help="Also write the markdown report here.")
    args = ap.parse_args()

    import torch

    from ragserve.build import build_index, plan_build_index
    from ragserve.config import RAGConfig
    from ragserve.embed import SentenceTransformerEmbedder

    config = RAGConfig()
    embedder = SentenceTransformerEmbedder(config.embed)
    embedder.warm_up()
    paras, questions = paragraphs()
    per_file = chunks_per_file(paras, embedder, config, args.seed)
    n_files = max(10, round(args.chunks / per_file))
    env = environment(gpu=False)
    header = [machine_line(env), versions_line(env),
              f"{n_files:,} files of {PARAGRAPHS_PER_FILE} XQuAD paragraphs (~{per_file:.1f} chunks each; "
              f"chunk_size {config.chunk.chunk_size}, overlap {config.chunk.chunk_overlap}); "
              f"{args.changed:.0%} of the files changed; embedding {embedder.precision}, "
              f"torch threads {torch.get_num_threads()}, batch {config.embed.batch_size}; seed {args.seed}"]
    print("\n".join(header), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        work = args.work or Path(tmp)
        src = work / "corpus"
        write_corpus(src, n_files, paras, args.seed)

        t = time.perf_counter()
        first = build_index(src, work / "idx", config, embedder=embedder)
        first_s = time.perf_counter() - t
        print(f"full build: {first.chunks:,} chunks in {first_s:.1f} s", flush=True)

        changed = change_files(src, args.changed, args.seed)
        t = time.perf_counter()
        plan = plan_build_index(src, work / "idx", config, embedder=embedder)
        plan_s = time.perf_counter() - t
        print(f"dry run: {plan.describe()} ({plan_s:.2f} s)", flush=True)

        t = time.perf_counter()
        inc = build_index(src, work / "idx", config, embedder=embedder)
        inc_s = time.perf_counter() - t
        print(f"incremental: {inc.embedded:,} chunks embedded in {inc_s:.1f} s", flush=True)

        t = time.perf_counter()
        ref = build_index(src, work / "ref", config, embedder=embedder, full=True)
        ref_s = time.perf_counter() - t
        print(f"full build of the changed folder: {ref_s:.1f} s", flush=True)

        agreement = top10_agreement(work / "idx", work / "ref", embedder.encode(questions[:400]))

    lines = [f"# Incremental build benchmark: {first.chunks:,} chunks, {changed} of {n_files:,} files changed",
             "", *[f"- {h}" for h in header], "",
             "| build | mode | files | chunks | chunks embedded | seconds | embed s | index s | hash + read s "
             "| write s | vs full build of the changed folder |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             row("first build", first, first_s, None),
             row(f"after {changed} files changed", inc, inc_s, ref_s),
             row("same folder, --full", ref, ref_s, None),
             "", f"Dry run (hash every file, plan): {plan_s:.2f} s — {plan.describe()}.",
             f"Incremental vs full build of the changed folder, top-10 of {min(400, len(questions))} XQuAD "
             f"questions: same ids in the same order for {agreement[0]:.1%}, the same up to swaps among scores "
             f"tied within 2e-3 for {agreement[1]:.1%} (the corpus repeats paragraphs: equal texts tie); "
             f"index type {inc.index_type}.",
             "Times are wall-clock on a machine shared with other jobs; the model is loaded once before."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
