"""The semantic answer tier on the headline stream: hit rate exact-only vs exact+semantic,
and the false-hit rate, with repeats paraphrased with probability p.

The stream is the headline one (``zipf_stream`` over XQuAD-en questions, Zipf s=1.1); each
repeat of a question is, with probability p, one of its meaning-keeping rewrites
(``ragserve.eval.paraphrases.rewrites``) instead of the same text. Both systems run the
package's own tiers in process — an exact dict keyed like L1 (``cache.keys``) and
``ragserve.cache.semantic.SemanticCache`` with the threshold and guard given — over the
project's default embedder. No generation is needed for hit and false-hit rates: a
semantic hit is *false* when the matched cached question's gold answers share none with
the asked question's (SQuAD normalisation, either containing the other counts as shared).
The ceiling is 1 − distinct meanings ÷ requests.

Also: the semantic lookup's cost in process with 10k and 100k entries in a partition.

    python benchmarks/bench_semantic.py --threshold 0.9 --guard strict --p 0,0.3,0.5 --n 2000,10000
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

import harness


def main() -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--xquad", type=Path, default=harness.XQUAD)
    ap.add_argument("--n", default="2000", help="requests per stream, comma-separated")
    ap.add_argument("--p", default="0,0.3,0.5", help="probability a repeat is a paraphrase, comma-separated")
    ap.add_argument("--s", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, required=True, help="e.g. what calibrate-semantic certified")
    ap.add_argument("--guard", default="strict")
    ap.add_argument("--lookup-sizes", default="10000,100000")
    ap.add_argument("--out", type=Path, default=harness.REPO / "reports" / "semantic.md")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--vectors", type=Path, default=None,
                    help="an .npz of texts and their vectors to reuse (written back with the new ones)")
    args = ap.parse_args()
    env = harness.environment(gpu=False)
    log = harness.logger("semantic")

    from ragserve.cache.keys import normalize_question
    from ragserve.config import RAGConfig, SemanticConfig
    from ragserve.eval.calibrate import clopper_pearson
    from ragserve.eval.datasets import squad_paragraphs
    from ragserve.eval.paraphrases import rewrites
    from ragserve.eval.scoring import normalize_answer
    from ragserve.profiling.workload import zipf_stream
    from ragserve.retrieval.embed import SentenceTransformerEmbedder

    items = [(q, frozenset(normalize_answer(a) for a in answers))
             for para in squad_paragraphs(args.xquad) for _, q, answers in para.qas if answers]
    sizes, probs = [int(x) for x in args.n.split(",")], [float(x) for x in args.p.split(",")]
    plans = {}
    for n in sizes:
        stream = zipf_stream(range(len(items)), n, s=args.s, seed=args.seed)
        for p in probs:
            rng, seen, asked = random.Random(f"{args.seed}/{p}"), set(), []
            for i in stream:
                text = items[i][0]
                if i in seen and rng.random() < p:
                    text = rng.choice(rewrites(text))
                seen.add(i)
                asked.append((i, text))
            plans[(n, p)] = (asked, len(seen))
    texts = sorted({normalize_question(t) for asked, _ in plans.values() for _, t in asked})
    embedder = SentenceTransformerEmbedder(RAGConfig().embed)
    embedder.warm_up()
    vectors = load_vectors(args.vectors)
    todo = [t for t in texts if t not in vectors]
    log(f"embedding {len(todo)} of {len(texts)} distinct texts")
    t0 = time.perf_counter()
    if todo:
        vectors.update(zip(todo, embedder.encode(todo, batch_size=64), strict=True))
        save_vectors(args.vectors, vectors)
    log(f"embedded in {time.perf_counter() - t0:.0f} s")

    def shares(a: frozenset[str], b: frozenset[str]) -> bool:
        return any(x == y or x in y or y in x for x in a for y in b)

    async def run(asked: list[tuple[int, str]], semantic: bool) -> dict[str, float]:
        from ragserve.cache.semantic import SemanticCache

        exact: dict[str, int] = {}
        tier = SemanticCache(SemanticConfig(enabled=True, threshold=args.threshold, guard=args.guard))
        hits = {"exact": 0, "semantic": 0, "false": 0, "miss": 0}
        for i, text in asked:
            q = normalize_question(text)
            if q in exact:
                hits["exact"] += 1
                continue
            if semantic:
                match = await tier.lookup("p", vectors[q], q)
                if match is not None:
                    hits["semantic"] += 1
                    hits["false"] += not shares(items[int(match.key.split(":", 1)[0])][1], items[i][1])
                    continue
            hits["miss"] += 1
            exact[q] = i
            if semantic:
                tier.remember("p", f"{i}:{q}", q, vectors[q])
        return hits

    rows = []
    for (n, p), (asked, distinct) in plans.items():
        base = asyncio.run(run(asked, False))
        sem = asyncio.run(run(asked, True))
        served = sem["semantic"]
        upper = clopper_pearson(served, sem["false"], 0.95)[1] if served else float("nan")
        rows.append({"n": n, "p": p, "ceiling": 1 - distinct / n, "exact_only": base["exact"] / n,
                     "with_semantic": (sem["exact"] + sem["semantic"]) / n, "semantic_hits": served,
                     "false_hits": sem["false"], "false_hit_rate": sem["false"] / served if served else 0.0,
                     "upper_95": upper})
        log(f"n={n} p={p}: {rows[-1]}")

    lookup = lookup_cost([int(x) for x in args.lookup_sizes.split(",")], embedder.dim)
    lines = ["# The semantic answer tier on the headline stream", "", *harness.run_lines(env),
             f"- stream: Zipf s={args.s} over {len(items)} XQuAD-en questions, seed {args.seed}; a repeat is a "
             "rewrite with probability p", f"- tier: threshold {args.threshold}, guard {args.guard}; embedder "
             f"{embedder.identity.get('name')}", "",
             "| requests | p | ceiling (1 − meanings/requests) | hits, exact only | hits, exact + semantic | "
             "semantic hits | false hits | false-hit rate | 95% upper bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['p']} | {r['ceiling']:.1%} | {r['exact_only']:.1%} | {r['with_semantic']:.1%} | "
                     f"{r['semantic_hits']} | {r['false_hits']} | {r['false_hit_rate']:.2%} | {r['upper_95']:.2%} |")
    lines += ["", "Semantic lookup in process (one partition, one query vector, the nearest row, the guard not "
              "reached): p50 / p99 over 200 lookups", "", "| entries | p50 ms | p99 ms |", "|---|---|---|"]
    for size, (p50, p99) in lookup.items():
        lines.append(f"| {size} | {p50:.3f} | {p99:.3f} |")
    harness.write_report("\n".join(lines), md=args.out, json_path=args.json, data={"rows": rows, "lookup": lookup})
    return 0


def load_vectors(path: Path | None) -> dict:
    import numpy as np

    if path is None or not path.is_file():
        return {}
    data = np.load(path)
    return dict(zip(data["texts"].tolist(), data["vectors"], strict=True))


def save_vectors(path: Path | None, vectors: dict) -> None:
    import numpy as np

    if path is not None:
        np.savez(path, texts=np.array(list(vectors)), vectors=np.stack(list(vectors.values())))


def lookup_cost(sizes: list[int], dim: int) -> dict[int, tuple[float, float]]:
    import numpy as np

    from ragserve.cache.semantic import Partition

    rng = np.random.default_rng(0)
    out = {}
    for size in sizes:
        part = Partition(size)
        v = rng.normal(size=(size, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        for i in range(size):
            part.add(str(i), "q", v[i])
        times = []
        for q in v[:200]:
            t = time.perf_counter()
            part.nearest(q)
            times.append((time.perf_counter() - t) * 1e3)
        out[size] = harness.pcts(times, 50, 99)
    return out


if __name__ == "__main__":
    sys.exit(main())
