"""Incremental build and hot reload benchmark: a full build against an incremental one
after 1% of the files changed, the time ``RAG.reload()`` takes, and query latency while
reloads run, on a generated corpus (default about 20,000 chunks).

The corpus is XQuAD's English paragraphs repeated with variations (each file holds a few
paragraphs and a line that makes it unique), written to a temporary folder. Steps, in
one process with one loaded embedding model:

1. full build of the corpus (version A), opened with ``RAG.from_index(...,
   start_engine=False)`` as a server would hold it (retrieval only: no vLLM engine);
2. 1% of the files (seeded) get a sentence appended;
3. ``--dry-run``'s plan (hashing every file);
4. incremental build: only the changed files are embedded; the path flips to version B;
5. reload: ``rag.reload()`` (the flipped path), then ``--reloads`` reloads alternating
   between the two version folders, a reload of the version already served, and
   ``verify`` alone (the hashing a reload does first);
6. query latency: ``rag.aretrieve`` (MiniLM + FAISS + docstore) with ``--concurrency``
   requests in flight, ``--requests`` distinct questions per phase, in ``--rounds``
   rounds of a baseline phase and a phase with reloads back to back in a thread (A, B,
   A, ...); every request's snapshot fingerprint is counted;
7. full build of the changed folder (``full=True``), the reference the incremental
   build must equal: the top-10 of XQuAD's questions are compared between the two
   (``--no-reference`` skips it).

Prints markdown tables with hardware and versions at the top. A benchmark, not a test:
on a shared machine read times as rough and compare the rows of one run.

Usage:
    python benchmarks/bench_incremental.py --chunks 2000            # quick check
    python benchmarks/bench_incremental.py --out reports/bench_incremental.md \
        --json reports/bench_incremental.json
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness
import numpy as np
from harness import pct, pcts, timed

from ragserve.eval.datasets import squad_paragraphs

PARAGRAPHS_PER_FILE = 4


def paragraphs() -> tuple[list[str], list[str]]:
    """XQuAD's paragraph texts and all its questions, in file order."""
    paras = squad_paragraphs(harness.XQUAD)
    return [p.context for p in paras], [text for p in paras for _, text, _ in p.qas]


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
    from ragserve.build.ingest import Document, chunk_documents

    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp), 50, paras, seed)
        docs = [Document(p.name, p.read_text("utf-8")) for p in sorted(Path(tmp).rglob("*.txt"))]
        n = sum(1 for _ in chunk_documents(docs, config.chunk.chunk_size, config.chunk.chunk_overlap,
                                           embedder.token_counter()))
    return n / 50


def plan_files(chunks: int, paras: list[str], embedder, config, seed: int) -> tuple[float, int]:
    """(chunks per generated file, files for about ``chunks`` chunks: at least 10)."""
    per_file = chunks_per_file(paras, embedder, config, seed)
    return per_file, max(10, round(chunks / per_file))


def describe_corpus(n_files: int, per_file: float, config) -> str:
    return (f"{n_files:,} files of {PARAGRAPHS_PER_FILE} XQuAD paragraphs (~{per_file:.1f} chunks each; "
            f"chunk_size {config.chunk.chunk_size}, overlap {config.chunk.chunk_overlap})")


@contextlib.contextmanager
def corpus_folder(work: Path | None, prefix: str, n_files: int, paras: list[str], seed: int) -> Iterator[Path]:
    """``work`` (else a temporary folder, removed afterwards) with the generated corpus written
    to its ``corpus`` folder."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        folder = work or Path(tmp)
        write_corpus(folder / "corpus", n_files, paras, seed)
        yield folder


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
    from ragserve.index.verify import verify
    from ragserve.retrieval.faiss_index import FaissIndex
    from ragserve.retrieval.index_spec import IndexSpec

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
            f"| {s.get('scan', 0) + s.get('model', 0) + s.get('read', 0):.2f} | {s.get('write', 0):.2f} "
            f"| {ratio} |")


# -- reload and query latency ------------------------------------------------------------


def question_pool(paras: list[str], questions: list[str], seed: int) -> list[str]:
    """Distinct queries from the corpus's own text: XQuAD's questions and the sentences of
    its paragraphs, shuffled (seeded) so that every phase draws from the same mix."""
    sentences = [x.strip() for p in paras for x in re.split(r"(?<=[.!?])\s+", p)]
    sentences = [x for x in sentences if 4 <= len(x.split()) <= 60]
    pool = list(dict.fromkeys(q.strip() for q in questions + sentences))
    rng = np.random.default_rng(seed + 7)
    return [pool[i] for i in rng.permutation(len(pool))]


def take(pool: list[str], start: int, n: int) -> list[str]:
    """``n`` queries from ``start``; past the end of the pool they get a suffix, so that
    no two requests of the run ask the same thing."""
    return [pool[i % len(pool)] + ("" if i < len(pool) else f" (variant {i // len(pool)})")
            for i in range(start, start + n)]


def count_snapshots(rag: Any) -> Counter:
    """Count, per index fingerprint, the requests that took each snapshot.

    NOTE: wraps ``rag.served.acquire`` on this one instance: every ``aretrieve`` takes
    exactly one snapshot there (on the engine loop's thread) and ``reload`` takes none, so
    the counts are the requests each version answered. The results carry no fingerprint.
    """
    counts: Counter = Counter()
    acquire = rag.served.acquire

    def counting() -> Any:
        snap = acquire()
        counts[snap.fingerprint] += 1
        return snap

    rag.served.acquire = counting
    return counts


async def drive(rag: Any, queries: list[str], concurrency: int, top_k: int) -> dict[str, Any]:
    """Send ``queries`` through ``rag.aretrieve`` with ``concurrency`` in flight; each
    request's latency in ms, the failures (exceptions, or fewer than ``top_k`` sources)."""
    latencies: list[float] = []
    failures: list[str] = []

    async def one(q: str) -> None:
        t = time.perf_counter()
        try:
            sources = await rag.aretrieve(q, top_k)
        except Exception as e:  # a failed request is a result of the benchmark: counted, shown
            failures.append(f"{type(e).__name__}: {e}")
            return
        latencies.append((time.perf_counter() - t) * 1e3)
        if len(sources) != top_k or not all(s.text for s in sources):
            failures.append(f"{len(sources)} sources (or an empty text) for {q!r}")

    seconds = await harness.run_clients(queries, concurrency, one)
    return {"seconds": seconds, "latencies_ms": latencies, "failures": failures}


class ReloadLoop(threading.Thread):
    """Reloads back to back, alternating between two version folders, until stopped."""

    def __init__(self, rag: Any, targets: list[Path]) -> None:
        super().__init__(name="bench-reloads", daemon=True)
        self.rag, self.targets = rag, targets
        self.stop = threading.Event()
        self.seconds: list[float] = []
        self.errors: list[str] = []
        self.unchanged = 0

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            target = self.targets[i % len(self.targets)]
            i += 1
            t = time.perf_counter()
            try:
                result = self.rag.reload(target)
            except Exception as e:  # reported in the output, and the loop goes on as a server would
                self.errors.append(f"{type(e).__name__}: {e}")
                continue
            self.seconds.append(time.perf_counter() - t)
            self.unchanged += not result["changed"]


def reload_figures(rag: Any, a: Path, b: Path, n: int) -> dict[str, Any]:
    """Reload times: the flipped path once, ``n`` alternating between the version folders
    ``a`` and ``b``, 3 of the version already served, 3 of ``verify`` alone."""
    from ragserve.index.verify import verify

    s, first = timed(rag.reload)
    if not first["changed"]:
        raise SystemExit(f"rag.reload() after the incremental build changed nothing: {first}")
    alternating = []
    for i in range(n):
        target = a if i % 2 == 0 else b  # B is served after the first reload
        s_i, r = timed(rag.reload, target)
        if not r["changed"] or Path(r["folder"]) != Path(os.path.realpath(target)):
            raise SystemExit(f"reload({target}) did not swap to it: {r}")
        alternating.append(s_i)
    current = Path(rag.manifest.folder)
    same = []
    for _ in range(3):
        s_i, r = timed(rag.reload, current)
        if r["changed"]:
            raise SystemExit(f"reloading the served version swapped: {r}")
        same.append(s_i)
    verify_s = [timed(verify, current)[0] for _ in range(3)]
    return {"after_flip": [s], "first": first, "alternating": alternating, "same_version": same,
            "verify": verify_s}


def latency_phases(rag: Any, counts: Counter, pool: list[str], targets: list[Path], *, rounds: int,
                   requests: int, concurrency: int,
                   top_k: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Warm up, then ``rounds`` × (a baseline phase, a phase with reloads back to back)."""
    warm = asyncio.run(drive(rag, take(pool, 0, 4 * concurrency), concurrency, top_k))
    start = 4 * concurrency
    phases = []
    for r in range(rounds):
        for kind in ("baseline", "reloading"):
            queries = take(pool, start, requests)
            start += requests
            counts.clear()
            loop = None
            if kind == "reloading":
                served = Path(rag.manifest.folder)
                # the version not served first, so that the first reload swaps
                loop = ReloadLoop(rag, sorted(targets, key=lambda t: t == served))
                loop.start()
            try:
                run = asyncio.run(drive(rag, queries, concurrency, top_k))
            finally:
                if loop is not None:
                    loop.stop.set()
                    loop.join()
            phase = {"round": r + 1, "kind": kind, "requests": len(queries), **run,
                     "fingerprints": dict(counts)}
            if loop is not None:
                phase.update(reloads_s=loop.seconds, reload_errors=loop.errors,
                             reloads_unchanged=loop.unchanged)
            phases.append(phase)
            print(f"round {r + 1} {kind}: {len(run['latencies_ms'])} served, {len(run['failures'])} failed, "
                  f"p99 {pct(run['latencies_ms'], 99):.1f} ms"
                  + (f", {len(loop.seconds)} reloads" if loop is not None else ""), flush=True)
    return phases, {"requests": len(warm["latencies_ms"]), "failures": warm["failures"]}


def ms(values: list[float], scale: float = 1.0) -> str:
    """min / median / max in ms."""
    if not values:
        return "– | – | –"
    v = np.asarray(values) * scale
    return f"{v.min():.1f} | {pct(v, 50):.1f} | {v.max():.1f}"


def latency_row(name: str, phases: list[dict[str, Any]], short: dict[str, str]) -> str:
    lat = np.concatenate([np.asarray(p["latencies_ms"], float) for p in phases])
    failed = sum(len(p["failures"]) for p in phases)
    sent = sum(p["requests"] for p in phases)
    rate = sent / sum(p["seconds"] for p in phases)
    reloading = any(p["kind"] == "reloading" for p in phases)
    reloads = sum(len(p.get("reloads_s", [])) for p in phases) if reloading else "–"
    fps: Counter = Counter()
    for p in phases:
        fps.update(p["fingerprints"])
    names = {fp: short.get(fp, f"`{fp[:8]}`") for fp in fps}
    served = ", ".join(f"{names[k]}: {v:,}" for k, v in sorted(fps.items(), key=lambda x: names[x[0]]))
    p50, p95, p99 = pcts(lat, 50, 95, 99)
    return (f"| {name} | {sent:,} | {failed} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {lat.max():.1f} "
            f"| {lat.mean():.1f} | {rate:.0f} | {reloads} | {served} |")


def reload_section(reloads: dict[str, Any], phases: list[dict[str, Any]]) -> list[str]:
    under_load = [x for p in phases for x in p.get("reloads_s", [])]
    rows = [("`rag.reload()` after the incremental build flipped the path (A → B)", reloads["after_flip"]),
            ("`rag.reload(version folder)`, alternating A ↔ B, no query load", reloads["alternating"]),
            ("the version already served (verified and opened, nothing swapped)", reloads["same_version"]),
            ("of a reload: `verify` alone (hashes + structure)", reloads["verify"]),
            ("back to back during the reloading phases (under query load)", under_load)]
    return ["## Reload (`RAG.reload`: verify every file's SHA-256 and the structure, map the index, swap)",
            "",
            "| reload | n | min ms | median ms | max ms |", "|---|---|---|---|---|",
            *[f"| {name} | {len(v)} | {ms(v, 1e3)} |" for name, v in rows], ""]


def latency_section(phases: list[dict[str, Any]], warm: dict[str, Any], short: dict[str, str]) -> list[str]:
    base = [p for p in phases if p["kind"] == "baseline"]
    reloading = [p for p in phases if p["kind"] == "reloading"]

    def failed(ps: list[dict[str, Any]], key: str = "failures") -> int:
        return sum(len(p.get(key, [])) for p in ps)

    return ["## Retrieval latency, without reloads and while reloads run back to back", "",
            "| phase | requests | failed | p50 ms | p95 ms | p99 ms | max ms | mean ms | req/s | reloads "
            "| served by index version |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *[latency_row(f"{p['round']}. {'baseline' if p['kind'] == 'baseline' else 'during reloads'}", [p],
                          short) for p in phases],
            latency_row("**all baseline**", base, short),
            latency_row("**all during reloads**", reloading, short),
            "",
            f"Failed requests: {failed(base)} of {sum(p['requests'] for p in base):,} in the baseline "
            f"phases, {failed(reloading)} of {sum(p['requests'] for p in reloading):,} during reloads; "
            "failed reloads: "
            f"{failed(reloading, 'reload_errors')}; reloads that found the version already served: "
            f"{sum(p['reloads_unchanged'] for p in reloading)}; warm-up: {warm['requests']} requests, "
            f"{len(warm['failures'])} failed (not in the table). A failure is an exception or fewer than "
            "top_k sources. Phases ran in the order listed, one after the other.",
            *[f"- failure: {f}" for p in phases for f in (p["failures"] + p.get("reload_errors", []))[:5]],
            ""]


def main() -> None:
    ap = harness.parser(__doc__, raw=False)
    ap.add_argument("--chunks", type=int, default=20_000, help="About this many chunks in the corpus.")
    ap.add_argument("--changed", type=float, default=0.01, help="Share of files changed before the rebuild.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None,
                    help="Folder for corpus and indexes (default: a temp dir).")
    ap.add_argument("--out", type=Path, default=None, help="Also write the markdown report here.")
    ap.add_argument("--json", type=Path, default=None,
                    help="Also write the raw figures (every latency) here.")
    ap.add_argument("--reloads", type=int, default=10,
                    help="Reloads alternating between the two versions, timed without query load.")
    ap.add_argument("--concurrency", type=int, default=8, help="Retrieval requests in flight.")
    ap.add_argument("--requests", type=int, default=600,
                    help="Requests per latency phase (distinct questions).")
    ap.add_argument("--rounds", type=int, default=2, help="Rounds of (baseline phase, phase with reloads).")
    ap.add_argument("--top-k", type=int, default=0, help="Sources per request (0: the config's query.top_k).")
    ap.add_argument("--no-reference", action="store_true",
                    help="Skip the full build of the changed folder and the top-10 comparison.")
    args = ap.parse_args()

    import torch

    from ragserve import RAG
    from ragserve.build.builder import build_index, plan_build_index
    from ragserve.config import RAGConfig
    from ragserve.retrieval.embed import SentenceTransformerEmbedder

    config = RAGConfig()
    top_k = args.top_k or config.query.top_k
    embedder = SentenceTransformerEmbedder(config.embed)
    embedder.warm_up()
    paras, questions = paragraphs()
    pool = question_pool(paras, questions, args.seed)
    per_file, n_files = plan_files(args.chunks, paras, embedder, config, args.seed)
    env = harness.environment(gpu=False)
    header = [*harness.machine_lines(env),
              f"{describe_corpus(n_files, per_file, config)}; {args.changed:.0%} of the files changed; "
              f"embedding {embedder.precision}, torch threads {torch.get_num_threads()}, batch {config.embed.batch_size}; seed {args.seed}",
              f"queries: `rag.aretrieve(q, top_k={top_k})`, {args.concurrency} in flight, {args.requests:,} "
              f"distinct questions per phase (XQuAD questions and sentences of its paragraphs, "
              f"{len(pool):,} before variants), {args.rounds} rounds of baseline then reloading; "
              f"micro-batch window {config.embed.batch_window_ms} ms, max batch {config.embed.max_batch}; "
              f"no generation engine (`start_engine=False`)"]
    print("\n".join(header), flush=True)

    with corpus_folder(args.work, "bench-incremental-", n_files, paras, args.seed) as work:
        src = work / "corpus"
        t = time.perf_counter()
        first = build_index(src, work / "idx", config, embedder=embedder)
        first_s = time.perf_counter() - t
        print(f"full build: {first.chunks:,} chunks in {first_s:.1f} s", flush=True)

        # A server holding version A while the build runs, as in production.
        rag = RAG.from_index(work / "idx", config, embedder=embedder, start_engine=False)
        try:
            counts = count_snapshots(rag)

            changed = change_files(src, args.changed, args.seed)
            t = time.perf_counter()
            plan = plan_build_index(src, work / "idx", config, embedder=embedder)
            plan_s = time.perf_counter() - t
            print(f"dry run: {plan.describe()} ({plan_s:.2f} s)", flush=True)

            t = time.perf_counter()
            inc = build_index(src, work / "idx", config, embedder=embedder)
            inc_s = time.perf_counter() - t
            print(f"incremental: {inc.embedded:,} chunks embedded in {inc_s:.1f} s", flush=True)

            version_a, version_b = Path(os.path.realpath(first.version)), Path(os.path.realpath(inc.version))
            short = {first.fingerprint: f"A `{first.fingerprint[:8]}`",
                     inc.fingerprint: f"B `{inc.fingerprint[:8]}`"}
            reloads = reload_figures(rag, version_a, version_b, args.reloads)
            print(f"reload after the flip: {reloads['after_flip'][0] * 1e3:.1f} ms; alternating: median "
                  f"{pct(reloads['alternating'], 50) * 1e3:.1f} ms", flush=True)

            phases, warm = latency_phases(rag, counts, pool, [version_a, version_b], rounds=args.rounds,
                                          requests=args.requests, concurrency=args.concurrency, top_k=top_k)
        finally:
            rag.close()
        # Printed now too: the reference build that follows takes as long as the first one.
        measured = reload_section(reloads, phases) + latency_section(phases, warm, short)
        print("\n".join(measured), flush=True)

        ref, ref_s, agreement = None, None, None
        if not args.no_reference:
            t = time.perf_counter()
            ref = build_index(src, work / "ref", config, embedder=embedder, full=True)
            ref_s = time.perf_counter() - t
            print(f"full build of the changed folder: {ref_s:.1f} s", flush=True)
            agreement = top10_agreement(work / "idx", work / "ref", embedder.encode(questions[:400]))

    load_end = [round(x, 2) for x in os.getloadavg()]
    vs = "full build of the changed folder" if ref is not None else "first (full) build"
    lines = [f"# Incremental build and reload benchmark: {first.chunks:,} chunks, {changed} of {n_files:,} "
             f"files changed", "", *[f"- {h}" for h in header], "",
             "## Builds", "",
             "| build | mode | files | chunks | chunks embedded | seconds | embed s | index s | hash + read s "
             f"| write s | vs {vs} |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             row("first build", first, first_s, None),
             row(f"after {changed} files changed", inc, inc_s, ref_s or first_s)]
    if ref is not None:
        lines.append(row("same folder, --full", ref, ref_s, None))
    lines += ["", f"Dry run (hash every file, plan): {plan_s:.2f} s — {plan.describe()}."]
    if agreement is not None:
        lines.append(f"Incremental vs full build of the changed folder, top-10 of {min(400, len(questions))} "
                     f"XQuAD questions: same ids in the same order for {agreement[0]:.1%}, the same up to "
                     f"swaps among scores tied within 2e-3 for {agreement[1]:.1%} (the corpus repeats "
                     f"paragraphs: equal texts tie); index type {inc.index_type}.")
    else:
        lines.append(f"Index type {inc.index_type}; the reference full build was skipped (`--no-reference`).")
    lines += ["", *measured,
              "Times are wall-clock on a machine shared with other jobs; the model is loaded once before; "
              f"load average at end {load_end}."]

    def build(r: Any, s: float | None) -> dict[str, Any] | None:
        return None if r is None else {"mode": r.mode, "files_read": r.files_read, "chunks": r.chunks,
                                       "embedded": r.embedded, "wall_s": s, "seconds": r.seconds,
                                       "fingerprint": r.fingerprint, "index_type": r.index_type}

    raw = {"env": env, "load_avg_at_end": load_end, "args": vars(args), "files": n_files, "changed_files": changed,
           "plan_s": plan_s, "builds": {"first": build(first, first_s), "incremental": build(inc, inc_s),
                                        "reference": build(ref, ref_s)},
           "top10_agreement": agreement, "reloads": {k: v for k, v in reloads.items() if k != "first"},
           "warm_up": warm, "phases": phases}
    harness.write_report("\n".join(lines) + "\n", args.out, args.json, raw)


if __name__ == "__main__":
    main()
