"""Priority classes under a batch flood: interactive requests (priority 0, a steady low rate)
beside a batch job (priority 10, 4x their volume, all sent at once), first come first served
against priority classes, on one real engine, in one run.

    flock /tmp/ragserve-engine.lock python benchmarks/bench_priority.py

Three phases on the same engine (``generate.scheduling = "priority"``, the answer cache off,
so every request generates), each with questions of its own:

- ``unloaded``: the interactive requests alone; their TTFT p50 sets the SLO (2x of it);
- ``fcfs``: the flood and the interactive requests, every one at priority 0. Equal
  priorities are served in arrival order by ragserve's admission queue and by vLLM's
  priority scheduler alike: that is first come, first served (today's behaviour);
- ``priority``: the same traffic with the flood at priority 10;
- ``reserved``: the same again, with ``--reserved`` of the run slots kept for priority 0
  (``query.reserved_in_flight``): the flood never holds the slot an interactive request
  needs, so it does not wait for a running answer to finish (vLLM does not preempt).

``query.max_in_flight`` (``--max-in-flight``, 4 here) bounds the runs in the engine, so a
queue forms in ragserve, ordered by (priority, arrival). Per class: goodput (interactive
requests whose TTFT met the SLO; the batch has none), p50/p95 TTFT and end to end, and
throughput (answers per second of the phase). TTFT is the caller's: from the call to the
first answer token of ``RAG.astream``.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import harness


def main() -> int:
    ap = harness.parser(__doc__)
    harness.xquad_arguments(ap, "priority.md", index_help="built from --xquad if absent")
    ap.add_argument("--interactive", type=int, default=8, help="interactive requests per phase")
    ap.add_argument("--rate", type=float, default=0.1,
                    help="interactive arrivals per second: below the engine's capacity alone (a 2-core "
                         "CPU answers about 0.2/s at max_tokens 32), else 'unloaded' is not")
    ap.add_argument("--batch-factor", type=int, default=4, help="flood = this x the interactive volume")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-in-flight", type=int, default=4)
    ap.add_argument("--reserved", type=int, default=1,
                    help="slots kept for priority 0 in the 'reserved' phase (query.reserved_in_flight)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not 0 <= args.reserved < args.max_in_flight:
        ap.error(f"--reserved must be in 0..{args.max_in_flight - 1} (--max-in-flight - 1)")
    env = harness.environment()
    log = harness.logger("priority")

    from ragserve import RAG, RAGConfig
    from ragserve.eval.datasets import load_dataset
    from ragserve.eval.evaluate import prepare_index
    from ragserve.retrieval.embed import SentenceTransformerEmbedder

    cfg = RAGConfig().replace(cache={"enabled": False}, generate={"max_tokens": args.max_tokens,
                                                                  "scheduling": "priority"},
                              query={"max_in_flight": args.max_in_flight})
    ds = load_dataset(args.xquad)
    questions = [q.text for q in ds.questions]
    random.Random(args.seed).shuffle(questions)
    n_i, n_b = args.interactive, args.interactive * args.batch_factor
    need = 4 * n_i + 3 * n_b
    if need > len(questions):
        raise SystemExit(f"{need} distinct questions needed, {args.xquad} has {len(questions)}")
    embedder = SentenceTransformerEmbedder(cfg.embed)
    if not args.index.exists():
        log(f"building {args.index} from {args.xquad}")
    prepare_index(ds, args.index, cfg, embedder)
    take = iter(questions)

    def draw(n: int) -> list[str]:
        return [next(take) for _ in range(n)]

    phases = {}
    with RAG.from_index(args.index, cfg, embedder=embedder) as rag:
        rag.query(questions[-1])  # the first request's one-time costs, outside every phase
        log("unloaded")
        phases["unloaded"] = asyncio.run(phase(rag, draw(n_i), [], args.rate, batch_priority=0))
        slo_ms = 2 * harness.pct([r["ttft_ms"] for r in phases["unloaded"]["interactive"]], 50)
        for name, batch_priority, reserved in (("fcfs", 0, 0), ("priority", 10, 0),
                                               ("reserved", 10, args.reserved)):
            # the same engine and admission queue for every phase; only the kept slots change,
            # between phases, with nothing queued
            rag.admission.reserved = reserved
            log(f"{name}: {n_b} batch requests at priority {batch_priority}, {n_i} interactive at 0, "
                f"{reserved} slot(s) kept for priority 0")
            phases[name] = asyncio.run(phase(rag, draw(n_i), draw(n_b), args.rate, batch_priority))
    text = report(phases, slo_ms, args, env)
    harness.write_report(text, args.out, args.json, {"slo_ttft_ms": slo_ms, "phases": phases})
    return 0


async def phase(rag, interactive: list[str], batch: list[str], rate: float, batch_priority: int) -> dict:
    """The flood sent at once, the interactive requests at ``rate`` per second beside it."""
    from ragserve.types import TokenEvent

    t0 = time.perf_counter()

    async def one(question: str, priority: int) -> dict:
        start = time.perf_counter()
        first = None
        async for event in rag.astream(question, priority=priority):
            if first is None and isinstance(event, TokenEvent) and event.text:
                first = time.perf_counter()
        end = time.perf_counter()
        return {"ttft_ms": ((first or end) - start) * 1e3, "e2e_ms": (end - start) * 1e3, "end_s": end - t0}

    async def paced() -> list[dict]:
        tasks = []
        for i, q in enumerate(interactive):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(q, 0)))
        return list(await asyncio.gather(*tasks))

    flood = [asyncio.ensure_future(one(q, batch_priority)) for q in batch]
    inter = await paced()
    done = list(await asyncio.gather(*flood))
    return {"interactive": inter, "batch": done, "seconds": time.perf_counter() - t0}


def report(phases: dict, slo_ms: float, args, env) -> str:
    lines = ["# Priority classes under a batch flood (one engine, one run)", "", *harness.run_lines(env), "",
             f"- interactive: {args.interactive} per phase at {args.rate:g}/s, priority 0; batch: "
             f"{args.interactive * args.batch_factor} sent at once; max_tokens {args.max_tokens}; "
             f"query.max_in_flight {args.max_in_flight}; 'reserved': {args.reserved} of them kept for "
             "priority 0; answer cache off",
             f"- interactive SLO: TTFT <= {slo_ms:.0f} ms (2x the unloaded p50)", "",
             "| phase | class | n | goodput | TTFT p50 ms | TTFT p95 ms | e2e p50 ms | e2e p95 ms "
             "| answers/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    stats = {(name, cls): summary(p[cls], slo_ms) for name, p in phases.items()
             for cls in ("interactive", "batch") if p[cls]}
    for (name, cls), st in stats.items():
        good = f"{st['good']}/{st['n']}" if cls == "interactive" else "—"
        lines.append(f"| {name} | {cls} | {st['n']} | {good} | {st['ttft'][0]:.0f} | {st['ttft'][1]:.0f} | "
                     f"{st['e2e'][0]:.0f} | {st['e2e'][1]:.0f} | {st['rate']:.2f} |")
    un = stats["unloaded", "interactive"]["ttft"][1]
    fcfs_rate, fcfs_good = stats["fcfs", "batch"]["rate"], stats["fcfs", "interactive"]["good"]
    lines += ["", "| phase | target | measured | met |", "|---|---|---|---|"]
    for name in ("priority", "reserved"):
        p95, rate = stats[name, "interactive"]["ttft"][1], stats[name, "batch"]["rate"]
        good = stats[name, "interactive"]["good"]
        lines += [f"| {name} | interactive TTFT p95 <= 1.5x unloaded ({1.5 * un:.0f} ms) | {p95:.0f} ms | "
                  f"{'yes' if p95 <= 1.5 * un else 'no'} |",
                  f"| {name} | batch throughput >= 0.8x FCFS | {rate / fcfs_rate:.2f}x | "
                  f"{'yes' if rate >= 0.8 * fcfs_rate else 'no'} |",
                  f"| {name} | interactive goodput >= 1.5x FCFS | {good} vs {fcfs_good} | "
                  f"{'yes' if good >= 1.5 * max(fcfs_good, 1e-9) else 'no'} |"]
    return "\n".join(lines)


def summary(rows: list[dict], slo_ms: float) -> dict:
    """One class of one phase: count, goodput (TTFT within the SLO), (p50, p95) of TTFT and
    end to end, and answers per second of the phase."""
    ttft = [r["ttft_ms"] for r in rows]
    return {"n": len(rows), "good": sum(t <= slo_ms for t in ttft), "ttft": harness.pcts(ttft, 50, 95),
            "e2e": harness.pcts([r["e2e_ms"] for r in rows], 50, 95),
            "rate": len(rows) / max(r["end_s"] for r in rows)}


if __name__ == "__main__":
    raise SystemExit(main())
