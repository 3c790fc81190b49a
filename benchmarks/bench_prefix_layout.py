"""Prompt layout against vLLM's prefix cache: sources in score order vs in index order.

With ``[prompt] order = "chunk_id"`` two questions that read the same chunks send the same
prompt up to the question, so vLLM's prefix cache serves that part again; in score order
the same chunks come in another order as soon as the scores differ. This script measures,
side by side in one run, for each order:

- the workload: ``--requests`` XQuAD-en questions drawn i.i.d. Zipf(``--s``) (a fixed
  random ranking, ``--seed``; ``ragserve.profiling.workload.zipf_stream``), ``--concurrency``
  in flight, the answer cache OFF so that every request reaches vLLM, vLLM's prefix cache
  reset just before the timed pass (after a warm-up);
- vLLM's own prefix-cache hit rate over that pass (token-weighted: hit tokens / looked-up
  prompt tokens, from its scheduler stats; ``rag.stats()["generator"]["prefix_cache"]``),
  time to first token (request start → first token: total − decode), prefill (vLLM's
  scheduled → first token), requests/s;
- answer quality: contains-gold of the workload's answers, and on the fixed protocol
  (``ragserve eval --answers --sample 200 --seed 1``: ``answer_eval.sample_questions``).

Each (``--gaps`` × ``--orders``) pair runs in its own engine (one at a time), ``--rounds`` times alternating A, B,
A, B. Prints markdown with hardware and versions at the top; ``--json`` keeps the rows.
A benchmark, not a test: run it alone on the machine.

Usage:
    python benchmarks/bench_prefix_layout.py --requests 256 --out reports/bench_prefix_layout.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import harness

from ragserve.config import RAGConfig
from ragserve.engine.runtime import map_bounded
from ragserve.eval.answers import answer_metrics, sample_questions, score
from ragserve.eval.datasets import load_dataset
from ragserve.eval.scoring import percentile
from ragserve.profiling.env import header_markdown
from ragserve.profiling.workload import zipf_stream


def parse_args() -> argparse.Namespace:
    ap = harness.parser(__doc__, raw=False)
    ap.add_argument("--dataset", default=str(harness.XQUAD))
    ap.add_argument("--index", default="indexes/eval-xquad.en-auto",
                    help="An index over the data set's paragraphs (built as `ragserve eval` builds it).")
    ap.add_argument("--orders", default="score,chunk_id")
    ap.add_argument("--gaps", default="0.05,0",
                    help="[prompt] max_score_gap values: the default, and 0 (every top-k source) where "
                         "the order of several sources matters most.")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--s", type=float, default=1.1, help="Zipf exponent.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--quality-sample", type=int, default=200, help="0 skips the protocol's contains-gold.")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    return ap.parse_args()


def one_pass(order: str, gap: float, args: argparse.Namespace, stream: list[Any], protocol: list[Any],
             embedder: Any) -> dict[str, Any]:
    from ragserve.rag import RAG

    cfg = RAGConfig.load().replace(cache={"enabled": False}, prompt={"order": order, "max_score_gap": gap})
    with RAG.from_index(args.index, cfg, embedder=embedder) as rag:
        rag.query_batch([q.text for q in stream[:4]])  # warm-up: first calls pay for lazy set-up
        if not rag.reset_prefix_cache():
            raise RuntimeError("vLLM's prefix cache could not be reset")
        t = time.perf_counter()
        results = asyncio.run(map_bounded(lambda q: rag.aquery(q.text), stream, args.concurrency))
        wall = time.perf_counter() - t
        prefix = rag.stats()["generator"]["prefix_cache"]
        ok = [r for r in results if not isinstance(r, Exception)]
        ttft = [r.timings.total - r.timings.generate_decode for r in ok]
        prefill = [r.timings.generate_first_token for r in ok]
        quality = answer_metrics(rag, protocol, concurrency=args.concurrency)[0] if protocol else None
    rows = [score(q, r) for q, r in zip(stream, results)]
    return {
        "order": order, "max_score_gap": gap, "requests": len(stream), "errors": len(stream) - len(ok), "seconds": round(wall, 2),
        "rps": len(ok) / wall, "prefix_hit_rate": prefix["hit_rate_since_reset"],
        "ttft_p50_ms": percentile(ttft, 50), "ttft_mean_ms": sum(ttft) / max(1, len(ttft)),
        "prefill_mean_ms": sum(prefill) / max(1, len(prefill)),
        "prompt_tokens_mean": sum(r.usage.prompt_tokens for r in ok) / max(1, len(ok)),
        "workload_contains": sum(r["contains"] for r in rows) / max(1, len(rows)),
        "protocol_contains": quality.contains if quality else None,
        "protocol_cut": quality.cut_share if quality else None,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| round | max_score_gap | order | prefix-cache hit rate | TTFT p50 / mean (ms) | prefill mean (ms) | req/s "
            "| prompt tokens | contains-gold (workload) | contains-gold (200-question protocol) | errors |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        proto = "-" if r["protocol_contains"] is None else f"{r['protocol_contains']:.3f}"
        lines.append(f"| {r['round']} | {r['max_score_gap']} | {r['order']} | {r['prefix_hit_rate']:.3f} | {r['ttft_p50_ms']:.0f} / "
                     f"{r['ttft_mean_ms']:.0f} | {r['prefill_mean_ms']:.0f} | {r['rps']:.2f} | "
                     f"{r['prompt_tokens_mean']:.0f} | {r['workload_contains']:.3f} | {proto} | {r['errors']} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    from ragserve.retrieval.embed import SentenceTransformerEmbedder

    env = harness.environment()
    ds = load_dataset(args.dataset)
    stream = zipf_stream(ds.questions, args.requests, s=args.s, seed=args.seed)
    protocol = sample_questions(ds.questions, args.quality_sample, 1) if args.quality_sample else []
    cfg = RAGConfig.load()
    embedder = SentenceTransformerEmbedder(cfg.embed)
    embedder.warm_up()
    rows = []
    for rnd in range(1, args.rounds + 1):
        for gap in (float(g) for g in args.gaps.split(",")):
            for order in args.orders.split(","):
                print(f"round {rnd}: max_score_gap={gap} order={order}", file=sys.stderr, flush=True)
                rows.append({"round": rnd, **one_pass(order, gap, args, stream, protocol, embedder)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    settings = {
        "workload": f"{args.requests} requests, XQuAD-en questions drawn Zipf(s={args.s}), seed {args.seed}, "
                    f"{len({q.qid for q in stream})} distinct",
        "in flight": args.concurrency, "answer cache": "off (every request reaches vLLM)",
        "prefix cache": "reset before each timed pass", "model": f"{cfg.generate.model}, greedy, "
                        f"max_tokens {cfg.generate.max_tokens}, top_k {cfg.query.top_k}",
        "vLLM KV block": "128 tokens on the CPU backend (16 on GPUs): prefix hits come in whole blocks",
        "index": args.index,
    }
    report = (f"# Prompt layout vs vLLM's prefix cache\n\n{header_markdown(env, settings)}\n{table(rows)}\n\n"
              "TTFT = request start to first token (total - decode); prefill = vLLM's scheduled -> first "
              "token. Hit rate = hit tokens / looked-up prompt tokens over the timed pass (vLLM's counters).\n")
    harness.write_report(report, args.out, args.json, {"env": env, "settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
