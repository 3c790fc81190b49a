"""Serving benchmark of issue 4: ragserve against raw vLLM and against the LlamaIndex setup
a user would pick instead, side by side in ONE run (the machine is shared and noisy, so
only ratios measured together mean much).

What it measures, at each concurrency C (default 1, 8, 32: C requests in flight, kept
full by a pool of C asyncio workers), on the same index, model, questions and prompts:

- (a) ragserve: ``await rag.aquery(q)``;
- (b) once, a sequential loop of blocking ``rag.query(q)`` (the largest level's questions):
  the baseline of "ragserve at C=32 gives ≥ 2× its own sequential loop";
- (c) raw vLLM: the same ``AsyncLLM`` engine ragserve runs, fed the byte-identical prompts
  (``rag.retrieve`` + ragserve's PromptBuilder, precomputed), no pipeline at all: the
  upper bound;
- (d) the peer: LlamaIndex ``VectorStoreIndex`` over ``FaissVectorStore`` with the same
  embedding model (``HuggingFaceEmbedding`` on the local folder), ragserve's own chunks and
  top_k, answering with ``OpenAILike`` → vLLM's OpenAI server on 127.0.0.1 (same model,
  dtype, max_model_len, KV cache, max_num_seqs, chat template; by default also the same
  engine process layout — ``--peer-vllm-defaults`` runs vLLM's default layout instead),
  via ``await query_engine.aquery(q)``. See ``bench_serving_peer.py``.

Reported per system × C: requests, errors, requests/s, output tokens/s, p50/p95 latency
(client side), mean prompt tokens, mean ms per stage (ragserve's ``QueryResult.timings``;
vLLM's queue / prefill / decode from its per-request timestamps, or for the peer from the
server's Prometheus histograms), answers that are non-empty and that contain a gold
answer (SQuAD normalisation), and CPU-seconds per process, per thread of this process
and of everything else on the machine (psutil). Also the ratios at the largest C, and
the embedding micro-batcher: throughput of 32 concurrent ``rag.aretrieve`` with
``embed.max_batch`` at its default against 1 (one model call per query).

Fairness: the answer cache is off; every system × C run starts with a short warm-up on
questions no run measures, then a reset of the measured engine's prefix cache
(``AsyncLLM.reset_prefix_cache()``; the peer server's ``POST /reset_prefix_cache``, for
which it runs with ``VLLM_SERVER_DEV_MODE=1``), so every system meets the same prompts
cold and no system inherits another's cache. Questions are distinct; each C has its own
slice, shared by all systems. Systems run interleaved per level in a rotating order (so
that drift in the machine's load does not always hit the same system); with ``--rounds 2``
each level runs twice, the second time in reverse order, and the rounds are pooled. The
sequential loop runs first. Both engines stay loaded throughout; the idle one costs little CPU (the
CPU table shows how much).

Run (from the repo root; ``make bench`` installs the peer first):

    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false python benchmarks/bench_serving.py --out reports/serving
    python benchmarks/bench_serving.py --max-tokens 16 --questions-per-level 4,8,16 --skip-peer  # a quick look

A benchmark, not a test: it asserts nothing, it reports. Expect 10-20 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bench_serving_workload as wl
import harness
from bench_serving_report import Record, Run, chart, cpu_per_request, cpu_table, merge_runs, results_table
from bench_serving_systems import Systems, embed_bench
from harness import CpuSampler

from ragserve.profiling.env import PEER_PACKAGES

SYSTEMS = ("ragserve", "raw vLLM", "LlamaIndex")


def parse_args() -> argparse.Namespace:
    ap = harness.parser(__doc__)
    harness.xquad_arguments(ap, "serving", "ragserve index folder (built from all 240 XQuAD paragraphs if missing)")
    ap.add_argument("--concurrency", default="1,8,32", help="levels, comma-separated")
    ap.add_argument("--questions-per-level", default="16,32,64", help="one count per level, or one for all")
    ap.add_argument("--sequential-questions", type=int, default=0,
                    help="questions of the sequential loop, taken from the largest level (0: all of them)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests before every run")
    ap.add_argument("--skip-peer", action="store_true", help="leave out (d), the LlamaIndex setup")
    ap.add_argument("--peer-vllm-defaults", action="store_true",
                    help="run the peer's vLLM server with vLLM's default process layout, not ragserve's")
    ap.add_argument("--peer-overlay", type=Path, default=harness.REPO / "build" / "bench-peer",
                    help="folder holding OpenAILike (see requirements/bench-peer.txt; `make bench-deps`)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of every system per level (same questions, cache reset each time), pooled; "
                         "on a busy machine 2 cancels linear load drift")
    ap.add_argument("--embed-requests", type=int, default=256, help="retrievals per embedding-batching run")
    ap.add_argument("--request-timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.per_level = per_level(ap, args)
    return args


def per_level(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict[int, int]:
    """``--concurrency 1,8,32`` and ``--questions-per-level 16,32,64`` (or one count for all)
    as ``{C: questions}``."""
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.questions_per_level.split(",")]
    if len(counts) == 1:
        counts *= len(levels)
    if len(counts) != len(levels):
        ap.error("--questions-per-level needs one count per --concurrency level, or a single count")
    return dict(zip(levels, counts))


log = harness.logger("bench")


async def drive(items: list[Any], concurrency: int, one: Callable[[int, Any], Awaitable[Record]],
                timeout_s: float) -> tuple[list[Record], float]:
    """C workers take the next item as soon as they finish one: C requests stay in flight
    (a closed loop, the load a batch job or a busy server puts on the engine)."""
    records: list[Record | None] = [None] * len(items)

    async def timed_one(i_item: tuple[int, Any]) -> None:
        i, item = i_item
        t = time.perf_counter()
        try:
            rec = await asyncio.wait_for(one(i, item), timeout_s)
        except Exception as e:  # noqa: BLE001 - a failed request is a result to report
            rec = Record(i, error=f"{type(e).__name__}: {e}"[:200])
        rec.latency_s = time.perf_counter() - t
        records[i] = rec

    wall = await harness.run_clients(enumerate(items), min(concurrency, len(items)), timed_one)
    return [r for r in records if r is not None], wall


async def measure(sys_: Systems, name: str, c: int, qs: list[wl.Question], args: argparse.Namespace,
                  sampler: CpuSampler) -> Run:
    warm = sys_.workload.warmup[: args.warmup]
    await sys_.run(name, warm, min(c, max(len(warm), 1)), drive, args.request_timeout)
    await sys_.reset_prefix_cache(name)
    before_metrics = await sys_.server_metrics(name)
    a = sampler.snapshot()
    records, wall = await sys_.run(name, qs, c, drive, args.request_timeout)
    b = sampler.snapshot()
    run = Run(name, c, records, wall, [q.answers for q in qs], cpu=sampler.delta(a, b),
              questions=[q.text for q in qs])
    if before_metrics is not None:
        run.server_stats = sys_.metric_deltas(before_metrics, await sys_.server_metrics(name))
    run.retrieval_overlap = sys_.overlap(name, qs, records)
    s = run.summary()
    log(f"{name:>10} C={c:<3} {len(qs)} q: {s['req_s']:.2f} req/s, p50 {s['p50_s']:.2f} s, "
        f"p95 {s['p95_s']:.2f} s, "
        f"{s['errors']} errors, gold {s['gold_hits']}/{len(qs)}")
    return run


async def run_levels(sys_: Systems, names: list[str], args: argparse.Namespace, sampler: CpuSampler) -> list[Run]:
    """Every system at every level, the order rotating per level; ``--rounds`` repeats
    each level, odd rounds backwards (a load that drifts linearly over the level then
    weighs the same on every system); rounds are pooled per system and level."""
    runs: list[Run] = []
    for i, c in enumerate(args.per_level):
        rounds: dict[str, list[Run]] = {name: [] for name in names}
        for r in range(args.rounds):
            order = names[i % len(names):] + names[: i % len(names)]
            for name in (order[::-1] if r % 2 else order):
                rounds[name].append(await measure(sys_, name, c, sys_.workload.levels[c], args, sampler))
        runs += [merge_runs(rs) for rs in rounds.values()]
    return runs


async def main_async(args: argparse.Namespace) -> None:
    from ragserve import RAGConfig

    env = harness.environment(*PEER_PACKAGES, "psutil")  # before the run: the machine's load average
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = RAGConfig().replace(cache={"enabled": False}, generate={"max_tokens": args.max_tokens})
    index_note = await asyncio.to_thread(wl.ensure_index, args.index, args.xquad, cfg)
    questions = wl.load_questions(args.xquad)
    workload = wl.split(questions, args.per_level, max(args.warmup, 1), args.seed)
    log(f"index {index_note}; {len(questions)} distinct questions")
    sys_ = Systems(args, cfg, workload, log)
    runs: list[Run] = []
    embed: dict[str, Any] = {}
    try:
        await sys_.start()
        sampler = CpuSampler(sys_.label_pid)
        embed = await embed_bench(args.index, cfg, workload.spare, args.embed_requests, drive, log)
        largest = max(args.per_level)
        seq_qs = workload.levels[largest][: args.sequential_questions or None]
        runs.append(await measure(sys_, "sequential", 1, seq_qs, args, sampler))
        runs += await run_levels(sys_, [n for n in SYSTEMS if n in sys_.available], args, sampler)
    finally:
        await sys_.stop()
    write_report(args, env, cfg, sys_, runs, embed, index_note)


def ratio_lines(summaries: list[dict[str, Any]], embed: dict[str, Any], peer_skipped: str | None) -> list[str]:
    top = max(s["concurrency"] for s in summaries if s["system"] != "sequential")
    at = {s["system"]: s for s in summaries if s["concurrency"] == top and s["system"] != "sequential"}
    seq = next((s for s in summaries if s["system"] == "sequential"), None)
    ours = at.get("ragserve")
    lines = [f"## Ratios at C={top}", ""]
    if ours is None:
        return lines + ["ragserve did not run."]

    def line(label: str, value: float, target: str, met: bool) -> str:
        return f"- {label}: **{value:.2f}** (target {target}: {'met' if met else 'NOT met'})"

    if "raw vLLM" in at:
        r = ours["req_s"] / at["raw vLLM"]["req_s"]
        lines.append(line("ragserve / raw vLLM, requests/s", r, "≥ 0.90", r >= 0.9))
    if seq:
        r = ours["req_s"] / seq["req_s"]
        lines.append(line("ragserve / its sequential `rag.query` loop, requests/s", r, "≥ 2", r >= 2))
    if "LlamaIndex" in at:
        peer = at["LlamaIndex"]
        r = ours["req_s"] / peer["req_s"]
        lines.append(line("ragserve / LlamaIndex, requests/s", r, "> 1", r > 1))
        lines.append(f"- p95 latency: ragserve **{ours['p95_s']:.2f} s** vs LlamaIndex **{peer['p95_s']:.2f} s** "
                     f"(ragserve / LlamaIndex {ours['p95_s'] / peer['p95_s']:.2f}; target < 1: "
                     f"{'met' if ours['p95_s'] < peer['p95_s'] else 'NOT met'})")
    elif peer_skipped:
        lines.append(f"- LlamaIndex: not measured ({peer_skipped})")
    cpu = {name: cpu_per_request(s) for name, s in at.items()}
    lines.append("- CPU-seconds per request at C={} (all of this benchmark's processes; less sensitive to other "
                 "load than wall time, though vLLM's OpenMP threads also burn CPU waiting when the cores are "
                 "contended): {}".format(top, ", ".join(f"{n} {v:.2f}" for n, v in cpu.items())))
    if embed.get("ratio"):
        lines.append(line(f"embedding micro-batching, retrievals/s at {embed['concurrency']} concurrent",
                          embed["ratio"], "≥ 5", embed["ratio"] >= 5))
    return lines


def write_report(args, env, cfg, sys_: Systems, runs: list[Run], embed: dict[str, Any], index_note: str) -> None:
    summaries = [r.summary() for r in runs]
    seq = next((s for s in summaries if s["system"] == "sequential"), None)
    g, v = cfg.generate, cfg.vllm
    page = [
        "# ragserve serving benchmark (issue 4)", "", *harness.run_lines(env),
        f"- index: {index_note}; {sys_.n_chunks} chunks (chunk_size {cfg.chunk.chunk_size}, overlap "
        f"{cfg.chunk.chunk_overlap}), {cfg.index.index_type}, top_k {cfg.query.top_k}",
        f"- models: embedding `{sys_.embed_path}`; generation `{sys_.gen_path}` (dtype {v.dtype}, "
        f"max_model_len {g.max_model_len}, kv cache {v.kv_cache_gib:g} GiB, max_num_seqs {v.max_num_seqs}, "
        f"enforce_eager {v.enforce_eager}, uniproc executor {v.uniproc_executor})",
        f"- generation: max_tokens {args.max_tokens}, temperature 0; answer cache OFF",
        f"- questions: XQuAD-en, distinct, seed {args.seed}; per level {args.per_level}; warm-up {args.warmup} "
        f"requests per run; {args.rounds} round(s) per system and level, pooled; sequential loop over "
        f"{seq['requests'] if seq else 0} questions of the largest level",
        f"- engine starts: ragserve {sys_.start_s.get('ragserve', 0):.0f} s"
        + (f", peer server {sys_.start_s['peer']:.0f} s" if "peer" in sys_.start_s else ""),
        f"- peer: {sys_.peer_note}", "",
        "## Results", "", *results_table(summaries), "",
        "Latency is measured at the client, per request; req/s counts successful requests over the run's "
        "wall time. Stage means in ms: ragserve's own `QueryResult.timings` (retrieval stages are shared "
        "by the queries of one micro-batch); queue/prefill/decode are vLLM's per-request timestamps "
        "(for LlamaIndex from the server's Prometheus histograms over the run). Gold hit: the answer "
        "contains a gold answer after SQuAD normalisation (whole words).", "",
        *ratio_lines(summaries, embed, sys_.peer_skipped), "",
        "## Embedding micro-batching", "", *embed_lines(embed), "",
        "## Where the CPU went", "", *cpu_table(summaries), "",
        "CPU-seconds from psutil over each measured run (cumulative counters read before and after). "
        "'Other load' is the whole machine's busy time minus this benchmark's processes: other users' "
        "work on the same 2 cores during that run.", "",
        "## Checks", "", *sys_.check_lines(runs), "",
        "## Method and fairness", "", fairness_text(), "",
        "## Sample answers", "", *sample_answers(runs), "",
    ]
    chart([s for s in summaries if s["system"] != "sequential"], args.out / "serving_benchmark.png", seq)
    raw = {"summaries": summaries, "embedding": embed, "answers": {
        f"{r.system} C={r.concurrency}": [[rec.answer, rec.error] for rec in r.records] for r in runs}}
    harness.write_report("\n".join(page), args.out / "serving_benchmark.md", args.out / "serving_benchmark.json", raw)
    log(f"wrote {args.out / 'serving_benchmark.md'}, .png and .json")


def fairness_text() -> str:
    text = " ".join(ln.strip() for ln in __doc__.split("Fairness:")[1].split("Run (")[0].split())
    return text[0].upper() + text[1:]


def sample_answers(runs: list[Run], n: int = 3) -> list[str]:
    """The first questions of the largest level, with every system's answer side by side."""
    top = max(r.concurrency for r in runs)
    at = [r for r in runs if r.concurrency == top and r.system != "sequential"]
    if not at:
        return []
    lines = ["| question | gold | " + " | ".join(r.system for r in at) + " |", "|---" * (len(at) + 2) + "|"]
    for i in range(min(n, len(at[0].records))):
        cells = [(r.records[i].answer or r.records[i].error).replace("|", "/").replace("\n", " ")[:160]
                 for r in at]
        gold = at[0].golds[i][0] if at[0].golds[i] else ""
        lines.append(f"| {at[0].questions[i]} | {gold} | " + " | ".join(cells) + " |")
    return lines


def embed_lines(embed: dict[str, Any]) -> list[str]:
    if "skipped" in embed:
        return [f"Not measured: {embed['skipped']}"]
    lines = ["| setting | retrievals | retrievals/s | p50 ms | p95 ms |", "|---|---:|---:|---:|---:|"]
    for label, s in embed["settings"].items():
        lines.append(f"| {label} | {s['n']} | {s['rate']:.1f} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} |")
    return lines + ["", f"{embed['concurrency']} retrievals in flight (`await rag.aretrieve(q)`, no generation), "
                        f"two alternating rounds per setting; ratio **{embed['ratio']:.2f}×**."]


def main() -> None:
    asyncio.run(main_async(parse_args()))


if __name__ == "__main__":  # vLLM's engine spawns processes: the guard is required
    main()
