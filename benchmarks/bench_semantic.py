"""The semantic answer tier on the headline stream: hit rate exact-only vs exact+semantic,
and the false-hit rate, with repeats paraphrased with probability p.

The stream is the headline one (``zipf_stream`` over XQuAD-en questions, Zipf s=1.1); each
repeat of a question is, with probability p, one of its meaning-keeping rewrites
(``ragserve.profiling.workload.paraphrase_repeats``, the stream ``bench_headline.py
--paraphrase`` sends too) instead of the same text. Both systems run the
package's own tiers in process — an exact dict keyed like L1 (``cache.keys``) and
``ragserve.cache.semantic.SemanticCache`` with the threshold and guard given — over the
project's default embedder. No generation is needed for hit and false-hit rates: a
semantic hit is *false* when the matched cached question's gold answers share none with
the asked question's (SQuAD normalisation, either containing the other counts as shared).
The ceiling is 1 − distinct meanings ÷ requests.

Also: the semantic lookup's cost with 10k and 100k entries in a partition (``--lookup-only``
measures only that, with no embedder: unit vectors at random, half the queries a planted
paraphrase of a stored one at cosine 0.80-0.95, half unrelated), through the tier's own
``SemanticCache.lookup`` (partition, search, threshold, guard), with the vectors in process and
again with an embedded Redis attached as L2 (``--lookup-redis``).

    python benchmarks/bench_semantic.py --threshold 0.9 --guard strict --p 0,0.3,0.5 --n 2000,10000
    python benchmarks/bench_semantic.py --lookup-only --lookup-redis --threshold 0.8

``--quality``: the first (n, p) stream through a real ``RAG`` over the XQuAD index (the
default vLLM engine: run it under ``flock /tmp/ragserve-engine.lock``), the requests in order;
then every request the semantic tier answered is generated afresh (cache off), and the
contains-gold of the served answers (against the asked question's gold answers) is compared
with the fresh generations'.

    flock /tmp/ragserve-engine.lock \
        python benchmarks/bench_semantic.py --quality --n 500 --p 0.3 --threshold 0.8
"""

from __future__ import annotations

import asyncio
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
    ap.add_argument("--lookup-only", action="store_true", help="only the lookup cost table (no embedder)")
    ap.add_argument("--lookup-redis", action="store_true",
                    help="also measure the lookup with an embedded Redis attached as L2")
    ap.add_argument("--lookups", type=int, default=1000, help="lookups per size (half planted hits)")
    ap.add_argument("--quality", action="store_true",
                    help="served vs fresh contains-gold on the first (n, p) stream with the real engine")
    ap.add_argument("--index", type=Path, default=harness.XQUAD_INDEX, help="for --quality (built if absent)")
    ap.add_argument("--out", type=Path, default=harness.REPO / "reports" / "semantic.md")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--vectors", type=Path, default=None,
                    help="an .npz of texts and their vectors to reuse (written back with the new ones)")
    args = ap.parse_args()
    env = harness.environment(gpu=False)
    log = harness.logger("semantic")

    if args.lookup_only:
        sizes_ = [int(x) for x in args.lookup_sizes.split(",")]
        lookup = lookup_table(sizes_, 384, args.threshold, args.guard, args.lookups, args.lookup_redis, log)
        lines = ["# The semantic tier's lookup cost", "", *harness.run_lines(env), "", *lookup_lines(lookup)]
        harness.write_report("\n".join(lines), md=args.out, json_path=args.json, data={"lookup": lookup})
        return 0

    from ragserve.cache.keys import normalize_question
    from ragserve.config import RAGConfig, SemanticConfig
    from ragserve.eval.calibrate import clopper_pearson
    from ragserve.eval.datasets import squad_paragraphs
    from ragserve.eval.scoring import normalize_answer
    from ragserve.profiling.workload import paraphrase_repeats, repeat_ceiling, zipf_stream
    from ragserve.retrieval.embed import SentenceTransformerEmbedder

    items = [(q, frozenset(normalize_answer(a) for a in answers))
             for para in squad_paragraphs(args.xquad) for _, q, answers in para.qas if answers]
    sizes, probs = [int(x) for x in args.n.split(",")], [float(x) for x in args.p.split(",")]
    plans = {}
    for n in sizes:
        stream = zipf_stream(range(len(items)), n, s=args.s, seed=args.seed)
        for p in probs:
            plans[(n, p)] = (paraphrase_repeats(stream, p, lambda i: items[i][0], seed=args.seed),
                             repeat_ceiling(stream))
    if args.quality:
        (n, p), (asked, ceiling) = next(iter(plans.items()))
        data = quality(asked, items, args, log)
        data.update(n=n, p=p, ceiling=ceiling)
        lines = ["# Answers the semantic tier served vs fresh generations", "", *harness.run_lines(env),
                 f"- stream: Zipf s={args.s} over {len(items)} XQuAD-en questions, seed {args.seed}, "
                 f"{n} requests, p={p}; tier: threshold {args.threshold}, guard {args.guard}; "
                 f"index {args.index}", "",
                 "| requests | answers by tier | generations | semantic hits scored | contains-gold served | "
                 "contains-gold fresh | served − fresh | served right, fresh wrong | "
                 "served wrong, fresh right |",
                 "|---|---|---|---|---|---|---|---|---|",
                 f"| {n} | {data['tiers']} | {data['generations']} | {data['scored']} | "
                 f"{data['served']:.3f} | {data['fresh']:.3f} | {data['served'] - data['fresh']:+.3f} | "
                 f"{data['only_served']} | "
                 f"{data['only_fresh']} |"]
        harness.write_report("\n".join(lines), md=args.out, json_path=args.json, data=data)
        return 0

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
        from ragserve.cache.semantic import SHORTLIST, SemanticCache

        exact: dict[str, int] = {}
        tier = SemanticCache(SemanticConfig(enabled=True, threshold=args.threshold, guard=args.guard))
        hits = {"exact": 0, "semantic": 0, "false": 0, "miss": 0, "shortlisted": 0, "shortlist_missed": 0}
        for i, text in asked:
            q = normalize_question(text)
            if q in exact:
                hits["exact"] += 1
                continue
            if semantic:
                match = await tier.lookup("p", vectors[q], q)
                part = tier.partitions["p"]
                if part.n > SHORTLIST:  # did the shortlist hold the row the exact scan picks?
                    hits["shortlisted"] += 1
                    hits["shortlist_missed"] += part.nearest(vectors[q])[0] != part.scan(vectors[q])[0]
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
    for (n, p), (asked, ceiling) in plans.items():
        base = asyncio.run(run(asked, False))
        sem = asyncio.run(run(asked, True))
        served = sem["semantic"]
        upper = clopper_pearson(served, sem["false"], 0.95)[1] if served else float("nan")
        rows.append({"n": n, "p": p, "ceiling": ceiling, "exact_only": base["exact"] / n,
                     "with_semantic": (sem["exact"] + sem["semantic"]) / n,
                     "exact_with_semantic": sem["exact"] / n, "semantic_hits": served,
                     "false_hits": sem["false"], "false_hit_rate": sem["false"] / served if served else 0.0,
                     "upper_95": upper, "shortlisted": sem["shortlisted"],
                     "shortlist_missed": sem["shortlist_missed"]})
        log(f"n={n} p={p}: {rows[-1]}")

    lookup = lookup_table([int(x) for x in args.lookup_sizes.split(",")], embedder.dim, args.threshold,
                          args.guard, args.lookups, args.lookup_redis, log)
    lines = ["# The semantic answer tier on the headline stream", "", *harness.run_lines(env),
             f"- stream: Zipf s={args.s} over {len(items)} XQuAD-en questions, seed {args.seed}; a repeat is a "
             "rewrite with probability p", f"- tier: threshold {args.threshold}, guard {args.guard}; embedder "
             f"{embedder.identity.get('name')}", "",
             "| requests | p | ceiling (1 − meanings/requests) | hits, exact only | hits, exact + semantic | "
             "of which exact | of which semantic | gain (points) | ceiling − exact only (points) | % of ceiling | semantic hits | false hits | "
             "false-hit rate | 95% upper bound | lookups over > 128 entries | shortlist ≠ exact nearest |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain, room = r["with_semantic"] - r["exact_only"], r["ceiling"] - r["exact_only"]
        lines.append(f"| {r['n']} | {r['p']} | {r['ceiling']:.1%} | {r['exact_only']:.1%} | "
                     f"{r['with_semantic']:.1%} | {r['exact_with_semantic']:.1%} | "
                     f"{r['semantic_hits'] / r['n']:.1%} | "
                     f"{100 * gain:+.1f} | {100 * room:.1f} | "
                     f"{r['with_semantic'] / r['ceiling']:.1%} | {r['semantic_hits']} | {r['false_hits']} | "
                     f"{r['false_hit_rate']:.2%} | {r['upper_95']:.2%} | {r['shortlisted']} | "
                     f"{r['shortlist_missed']} |")
    lines += ["", *lookup_lines(lookup)]
    harness.write_report("\n".join(lines), md=args.out, json_path=args.json, data={"rows": rows, "lookup": lookup})
    return 0


def quality(asked: list[tuple[int, str]], items: list, args, log) -> dict:
    """The stream through a real RAG in order; then the semantic hits generated afresh."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    import bench_serving_workload as wl

    from ragserve import RAG
    from ragserve.config import RAGConfig, SemanticConfig
    from ragserve.eval.scoring import contains_answer

    semantic = SemanticConfig(enabled=True, threshold=args.threshold, guard=args.guard)
    config = replace(RAGConfig(), semantic=semantic)
    log(f"index: {wl.ensure_index(args.index, args.xquad, config)}")
    tiers: dict[str, int] = {}
    hits = []
    with RAG.from_index(args.index, config) as rag:
        t0 = time.perf_counter()
        for k, (i, text) in enumerate(asked):
            r = rag.query(text)
            tiers[r.cache_tier] = tiers.get(r.cache_tier, 0) + 1
            if r.cache_tier == "semantic":
                hits.append((i, text, r.answer))
            if k % 50 == 0:
                log(f"{k} of {len(asked)} requests, {tiers}, {time.perf_counter() - t0:.0f} s")
        log(f"stream done in {time.perf_counter() - t0:.0f} s; {len(hits)} semantic hits to generate afresh")
        with ThreadPoolExecutor(16) as pool:
            fresh = list(pool.map(lambda h: rag.query(h[1], cache_read=False, cache_write=False).answer,
                                  hits))
        log(f"fresh generations done at {time.perf_counter() - t0:.0f} s")
    served = [contains_answer(answer, items[i][1]) for i, _, answer in hits]
    again = [contains_answer(answer, items[i][1]) for (i, _, _), answer in zip(hits, fresh, strict=True)]
    n = max(1, len(hits))
    return {"tiers": tiers, "generations": tiers.get("miss", 0) + len(hits), "scored": len(hits),
            "served": sum(served) / n, "fresh": sum(again) / n,
            "only_served": sum(a > b for a, b in zip(served, again, strict=True)),
            "only_fresh": sum(b > a for a, b in zip(served, again, strict=True)),
            "pairs": [{"question": t, "served": a, "fresh": f}
                      for (_, t, a), f in zip(hits, fresh, strict=True)]}


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


def lookup_table(sizes: list[int], dim: int, threshold: float, guard: str, lookups: int, redis: bool,
                 log) -> list[dict]:
    """Lookup p50/p99 through ``SemanticCache.lookup`` per partition size, in process and
    (``redis``) with an embedded Redis as L2; and how many planted paraphrases were served."""
    rows = [lookup_cost(size, dim, threshold, guard, lookups, None) for size in sizes]
    if redis:
        from ragserve.cache.redis_server import RedisServer

        server = RedisServer().start()
        try:
            rows += [lookup_cost(size, dim, threshold, guard, lookups, server.url) for size in sizes]
        finally:
            server.stop()
    for r in rows:
        log(f"lookup: {r}")
    return rows


def lookup_lines(rows: list[dict]) -> list[str]:
    return ["Semantic lookup (`SemanticCache.lookup`: partition, search, threshold, guard), one partition; "
            "half the queries a stored entry's planted paraphrase (cosine 0.80-0.95 to it, same question "
            "text), half unrelated; the tier's default sync interval (200 ms) with Redis", "",
            "| entries | Redis | lookups | p50 ms | p99 ms | mean ms | planted paraphrases served |",
            "|---|---|---|---|---|---|---|",
            *(f"| {r['entries']:,} | {'embedded L2' if r['redis'] else 'none'} | {r['lookups']} | "
              f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} | {r['planted_served']} of "
              f"{r['planted']} |" for r in rows)]


def lookup_cost(size: int, dim: int, threshold: float, guard: str, lookups: int,
                redis_url: str | None) -> dict:
    import numpy as np

    from ragserve.cache.l2 import RedisL2
    from ragserve.cache.semantic import SemanticCache
    from ragserve.config import SemanticConfig

    rng = np.random.default_rng(size)
    v = rng.normal(size=(size, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    planted = lookups // 2
    rows = rng.choice(size, planted, replace=False)
    # A paraphrase of row r at cosine c: c·v_r + sqrt(1 - c²)·u, u a unit vector orthogonal to v_r.
    cos = rng.uniform(max(threshold, 0.80), 0.95, planted).astype(np.float32)
    noise = rng.normal(size=(planted, dim)).astype(np.float32)
    noise -= (noise * v[rows]).sum(1, keepdims=True) * v[rows]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    near = cos[:, None] * v[rows] + np.sqrt(1 - cos**2)[:, None] * noise
    far = rng.normal(size=(lookups - planted, dim)).astype(np.float32)
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    queries = [(q, f"question {r}") for q, r in zip(near, rows, strict=True)]
    queries += [(q, "an unrelated question") for q in far]
    order = rng.permutation(len(queries))

    async def run() -> dict:
        l2 = RedisL2(redis_url, ttl_s=3600, timeout_s=0.05) if redis_url else None
        tier = SemanticCache(SemanticConfig(enabled=True, threshold=threshold, guard=guard), l2)
        part = tier.partition("bench")
        for i in range(size):
            part.add(f"k{i}", f"question {i}", v[i])
        times, served = [], 0
        for j in order:
            q, text = queries[j]
            t = time.perf_counter()
            match = await tier.lookup("bench", q, text)
            times.append((time.perf_counter() - t) * 1e3)
            served += match is not None and j < planted and match.key == f"k{rows[j]}"
        if l2 is not None:
            await l2.close()
        p50, p99 = harness.pcts(times, 50, 99)
        return {"entries": size, "redis": bool(redis_url), "lookups": len(times), "p50_ms": p50,
                "p99_ms": p99, "mean_ms": sum(times) / len(times), "planted": planted,
                "planted_served": served}

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
