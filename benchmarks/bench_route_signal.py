"""Is retrieval's own score a usable "this question is hard" signal for ``[models] route = "auto"``?

Over XQuAD-en (every paragraph one file, the package's default embedder and index), a
sample of questions is answered by the one packaged model (SmolLM2-135M, the default
config, answer cache off) and scored with the package's own scorer (contains-gold,
``eval/scoring.py``); beside each answer, the two signals the router can read for free
from the retrieval every miss does (``engine/models.route_signal``): the top score and
the gap between the first two. The report buckets the questions by each signal and gives
contains-gold and hit@1 per bucket, and for a range of thresholds the share of questions
that would go to the large model and the small model's contains-gold on the rest.

What it cannot show here: the large model's quality on the questions routed to it. That
needs a second, stronger model (GPU-only on this project's machines).

    flock /tmp/ragserve-engine.lock python benchmarks/bench_route_signal.py --n 200
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from pathlib import Path

import harness


def main() -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--xquad", type=Path, default=harness.XQUAD)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", type=Path, default=harness.REPO / "reports" / "route_signal.md")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--retrieval-only", action="store_true",
                    help="no engine: the signals and hit@1 only (every question when --n covers them)")
    args = ap.parse_args()
    env = harness.environment(gpu=False)
    log = harness.logger("route")

    from ragserve import RAG, RAGConfig
    from ragserve.build.builder import build_index
    from ragserve.engine.models import route_signal
    from ragserve.eval.datasets import squad_paragraphs
    from ragserve.eval.scoring import contains_answer

    with tempfile.TemporaryDirectory() as tmp:
        corpus, items = Path(tmp) / "corpus", []
        corpus.mkdir()
        for i, para in enumerate(squad_paragraphs(args.xquad)):
            name = f"p{i:04d}.txt"
            (corpus / name).write_text(para.context, encoding="utf-8")
            items += [(q, answers, name) for _, q, answers in para.qas if answers]
        sample = random.Random(args.seed).sample(items, min(args.n, len(items)))
        cfg = RAGConfig().replace(cache={"enabled": False})
        log(f"building the index over {len(list(corpus.iterdir()))} paragraphs")
        build_index(corpus, Path(tmp) / "index", cfg)
        with RAG.from_index(Path(tmp) / "index", cfg, start_engine=not args.retrieval_only) as rag:
            rows = asyncio.run(answer(rag, sample, args.concurrency, route_signal, not args.retrieval_only))
    for row, (_, answers, _) in zip(rows, sample, strict=True):
        row["contains"] = float("nan") if row["answer"] is None else contains_answer(row["answer"], answers)
    text = report(rows, env)
    harness.write_report(text, args.out, args.json, {"rows": rows})
    return 0


async def answer(rag, sample, concurrency, route_signal, generate=True):
    gate = asyncio.Semaphore(concurrency)

    async def one(item):
        question, _, doc = item
        async with gate:
            sources = await rag.aretrieve(question)
            r = await rag.aquery(question) if generate else None
        return {"question": question, "answer": r.answer if r else None, "hit1": sources[0].doc_id == doc,
                "top": route_signal("top_score", sources), "gap": route_signal("score_gap", sources)}

    return list(await asyncio.gather(*(one(item) for item in sample)))


def report(rows, env) -> str:
    n = len(rows)
    lines = ["# Route signal: retrieval score against the small model's answers (XQuAD-en)", "",
             *harness.machine_lines(env), "", f"{n} questions, `random.Random(seed)`; contains-gold of "
             "SmolLM2-135M's answer (default config, cache off).", "",
             "(--retrieval-only: no answer generated)" if rows[0]["answer"] is None else "",
             f"Overall contains-gold {mean(r['contains'] for r in rows):.3f}, hit@1 "
             f"{mean(r['hit1'] for r in rows):.3f}.", ""]
    for key, label in (("top", "top score"), ("gap", "gap first-second")):
        values = sorted(r[key] for r in rows)
        cuts = [values[int(len(values) * q)] for q in (0.25, 0.5, 0.75)]
        lines += [f"## By {label} (quartiles)", "", "| bucket | n | contains-gold | hit@1 |",
                  "|---|---|---|---|"]
        edges = [float("-inf"), *cuts, float("inf")]
        for lo, hi in zip(edges, edges[1:], strict=False):
            b = [r for r in rows if lo <= r[key] < hi]
            lines.append(f"| [{lo:.3f}, {hi:.3f}) | {len(b)} | {mean(r['contains'] for r in b):.3f} | "
                         f"{mean(r['hit1'] for r in b):.3f} |")
        lines += ["", f"### Routing by {label}: below the threshold goes to the large model", "",
                  "| threshold | to large | small's contains-gold on what it keeps | on what it hands over |",
                  "|---|---|---|---|"]
        for q in (0.1, 0.2, 0.3, 0.5):
            t = values[int(len(values) * q)]
            kept = [r for r in rows if r[key] >= t]
            handed = [r for r in rows if r[key] < t]
            lines.append(f"| {t:.3f} | {len(handed) / n:.2f} | {mean(r['contains'] for r in kept):.3f} | "
                         f"{mean(r['contains'] for r in handed):.3f} |")
        lines.append("")
    return "\n".join(lines)


def mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
