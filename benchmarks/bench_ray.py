"""Ray serving benchmark of issue 12, items (a)-(d): ``ragserve serve --ray`` against
``ragserve serve`` and ragserve in-process, side by side in ONE run on this machine, with the
same engine settings everywhere (only ratios measured together mean much here).

- (a) the Ray path's per-request overhead: L1 hits (``POST /v1/query`` on a warm hot set)
  and retrieval-only requests (``POST /v1/retrieve``, distinct XQuAD questions) from
  ``--concurrency`` clients (16) for ``--requests`` requests, on ``serve`` and ``ray``:
  requests/s, p50/p99, CPU per request; the differences per request are the overhead;
- (b) 1 vs 2 ingress replicas (``ray`` vs ``ray-2``) on the same two loads. L1 is per
  replica: the hot set is asked until every replica has answered every question (its first
  answer on the second replica is an L2 hit from the shared Redis, which fills that
  replica's L1; a generation again if the first replica's Redis write has not landed yet), so
  the measured run is L1 hits on every replica (the X-Cache column shows it);
- (c) misses through the Ray generator deployment (``ray``) vs in-process at
  ``--miss-concurrency`` (32), distinct XQuAD questions, answer cache off per request:
  requests/s, p50/p95, against ``serve`` (ragserve's vLLM in the same process as the
  pipeline, HTTP in front: like with like) and against ``in-process`` (``rag.aquery`` in
  this process, no HTTP); target >= 0.9x;
- (d) ``openai``: ``ragserve serve`` with the ``openai`` backend on vLLM's own OpenAI server
  (``bench_serving_peer.PeerServer``, same engine settings) vs the same two, same measure.

Method: one system up at a time (at most one vLLM engine), measured, taken down
(``bench_ray_systems.py``). One Redis (``RedisServer`` on a TCP port, so Ray's replicas reach
it) for all; each system's hit run uses a namespace of its own, so it starts cold. Every
miss run starts with ``--warmup`` requests on questions no run measures and an emptied
vLLM prefix cache (``/admin/reset_prefix_cache``, which reaches the generator deployment or
the OpenAI server); hit and retrieval runs start after a warm-up outside the measured run.
Threads: Ray sets each replica's ``OMP_NUM_THREADS`` from the CPUs it reserves, so the local
cluster declares 3 logical CPUs: the generator reserves 2 (vLLM's engine gets both cores,
as in ``ragserve serve``), each ingress replica 0.5 (its embedder gets 1 thread, as
``ragserve serve``'s does beside a local engine: ``rag.serving_embed_config``).
CPU-seconds from psutil over every process of the run (cumulative counters, before/after).

Run (repo root; on an otherwise idle machine; about 15 min at the defaults):

    python benchmarks/bench_ray.py --out reports/ray
    python benchmarks/bench_ray.py --quick --out reports/ray-quick                 # a few dozen requests
    python benchmarks/bench_ray.py --systems serve,ray --requests 2000 --out reports/ray-a

A benchmark, not a test: it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import bench_serving as bs
import bench_serving_workload as wl
import harness
from bench_http_hits import closed_loop
from bench_ray_systems import SYSTEMS, System, warm_l1
from bench_serving_report import Run, cpu_table, results_table
from harness import CpuSampler

from ragserve.profiling.env import PEER_PACKAGES

ADMIN_KEY = "bench-ray-admin-key-0123456789"
QUICK = {"requests": 48, "miss_requests": 32, "hot": 8}
ENGINE_STAGES = ("generate_queue", "generate_first_token", "generate_decode")
AROUND = {"ray": "the handle call to the generator replica and back, and its loop",
          "openai": "the stream from vLLM's OpenAI server; its split is timed client-side, so ~0",
          "serve": "the hop to vLLM's output handler and back",
          "in-process": "the hop to vLLM's output handler and back"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = harness.parser(__doc__)
    harness.xquad_arguments(ap, "ray")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"comma-separated, from: {', '.join(SYSTEMS)}")
    ap.add_argument("--concurrency", type=int, default=16, help="clients of the hit and retrieval runs")
    ap.add_argument("--requests", type=int, default=4000, help="requests per hit run and per retrieval run")
    ap.add_argument("--hot", type=int, default=32, help="distinct questions of the hit runs")
    ap.add_argument("--miss-concurrency", type=int, default=32)
    ap.add_argument("--miss-requests", type=int, default=128, help="distinct questions per miss run")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests before every miss run")
    ap.add_argument("--embed-threads", type=int, default=0,
                    help="embed.threads everywhere (0: torch's default)")
    ap.add_argument("--quick", action="store_true",
                    help="a small run: --requests 48 --miss-requests 32 --hot 8 (where not given)")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--request-timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    args.systems = [n.strip() for n in args.systems.split(",") if n.strip()]
    if unknown := set(args.systems) - set(SYSTEMS):
        ap.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    return args


def settings(args: argparse.Namespace, redis_url: str) -> dict[str, str]:
    """The engine and server settings every system gets (``RAGSERVE_*`` env; the in-process
    system loads the same dict with ``RAGConfig.load``)."""
    env = {"RAGSERVE_GENERATE_MAX_TOKENS": str(args.max_tokens), "RAGSERVE_SERVER_ADMIN_KEY": ADMIN_KEY,
           "RAGSERVE_REDIS_URL": redis_url, "RAGSERVE_CACHE_ENABLED": "true",
           "RAGSERVE_QUERY_MAX_IN_FLIGHT": str(max(64, args.miss_concurrency, args.concurrency)),
           "RAGSERVE_QUERY_MAX_QUEUED": "256",
           # Ray: a local cluster of 3 logical CPUs (no dashboard: run.py), 2 x 0.5 ingress + 2
           # generator, so Ray gives vLLM 2 OpenMP threads and each embedder 1 (see the docstring)
           "RAGSERVE_RAY_LOCAL_NUM_CPUS": "3", "RAGSERVE_RAY_NUM_CPUS": "0.5",
           "RAGSERVE_RAY_GENERATOR_NUM_CPUS": "2", "RAY_USAGE_STATS_ENABLED": "0"}
    if args.embed_threads:
        env["RAGSERVE_EMBED_THREADS"] = str(args.embed_threads)
    return env


log = harness.logger("bench-ray")


async def loop_run(system: System, workload: str, path: str, bodies: list[dict[str, Any]],
                   args: argparse.Namespace, sampler: CpuSampler) -> dict[str, Any]:
    a = sampler.snapshot()
    row = await closed_loop(system.client, path, bodies, args.concurrency, args.requests)
    cpu = sampler.delta(a, sampler.snapshot())
    ok = max(row["requests"] - sum(row["errors"].values()), 1)
    ours = {k: v for k, v in cpu["procs"].items() if not k.startswith("bench process")}
    row.update(system=system.name, workload=workload, cpu=cpu, server_cpu_ms=sum(ours.values()) / ok * 1e3,
               client_cpu_ms=(cpu["ours_s"] - sum(ours.values())) / ok * 1e3)
    log(f"{system.name} {workload}: {row['req_s']:.0f} req/s, p50 {row['p50_ms']:.1f} ms, "
        f"p99 {row['p99_ms']:.1f} ms, {sum(row['errors'].values())} errors, tiers {row['tiers']}, "
        f"replicas {len(row['replicas']) or 1}")
    return row


async def measure_system(system: System, args: argparse.Namespace, hot: list[str], pool: list[str],
                         sampler: CpuSampler) -> tuple[list[dict[str, Any]], list[Run]]:
    loops: list[dict[str, Any]] = []
    runs: list[Run] = []
    if "hits" in system.runs:
        ns = f"bench-ray-{system.name}-{uuid.uuid4().hex[:8]}"  # a cold cache for this system
        bodies = [{"question": q, "namespace": ns} for q in hot]
        warmed = await warm_l1(system.client, bodies, system.replicas, args.concurrency)
        log(f"{system.name}: hot set warmed on {system.replicas} replica(s): {warmed}")
        loops.append(await loop_run(system, "L1 hits", "/v1/query", bodies, args, sampler))
    if "retrieve" in system.runs:
        bodies = [{"question": q} for q in pool]
        await closed_loop(system.client, "/v1/retrieve", bodies[::-1], args.concurrency, 2 * args.concurrency)
        loops.append(await loop_run(system, "retrieve", "/v1/retrieve", bodies, args, sampler))
    if "misses" in system.runs:
        qs = system.workload.levels[args.miss_concurrency]
        runs.append(await bs.measure(system, system.name, args.miss_concurrency, qs, args, sampler))
    return loops, runs


async def main_async(args: argparse.Namespace) -> None:
    from ragserve import RAGConfig
    from ragserve.cache.redis_server import RedisServer, free_port

    machine = harness.environment(*PEER_PACKAGES, "psutil", "ray", "fastapi", "uvicorn", "httpx")  # before the run
    args.out.mkdir(parents=True, exist_ok=True)
    index_note = await asyncio.to_thread(wl.ensure_index, args.index, args.xquad, RAGConfig())
    workload = wl.split(wl.load_questions(args.xquad), {args.miss_concurrency: args.miss_requests},
                        max(args.warmup, 1), args.seed)
    hot = [q.text for q in workload.spare[: args.hot]]
    pool = [q.text for q in workload.spare[args.hot:]]
    redis = RedisServer(port=free_port(), maxmemory="512mb")
    redis.start()
    env = settings(args, redis.url)
    current: list[System] = []
    sampler = CpuSampler(lambda pid: current[0].label(pid) if current else str(pid))
    loops: list[dict[str, Any]] = []
    runs: list[Run] = []
    systems: dict[str, dict[str, Any]] = {}
    try:
        for name in args.systems:
            system = System(name, args, env, workload, log)
            current[:] = [system]
            try:
                await system.start()
                got_loops, got_runs = await measure_system(system, args, hot, pool, sampler)
                loops += got_loops
                runs += got_runs
            except Exception as e:  # noqa: BLE001 - one system failing still reports the others
                log(f"{name} failed: {type(e).__name__}: {e}")
                systems.setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"[:500]
            finally:
                await system.stop()
                current.clear()
            systems.setdefault(name, {}).update(description=system.description, start_s=system.start_s,
                                                threads=system.threads)
    finally:
        redis.stop()
    write_report(args, machine, index_note, systems, loops, runs)


# -- report ---------------------------------------------------------------------------------

def loop_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| system | load | C | requests | errors | req/s | p50 ms | p99 ms | ms per request (1/req/s) | "
             "server CPU-ms / req | client CPU-ms / req | X-Cache | replicas answering |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['workload']} | {r['clients']} | {r['requests']} | "
                     f"{sum(r['errors'].values()) or 0}{' ' + str(r['errors']) if r['errors'] else ''} | "
                     f"{r['req_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {1e3 / r['req_s']:.2f} | "
                     f"{r['server_cpu_ms']:.2f} | {r['client_cpu_ms']:.2f} | {r['tiers'] or '—'} | "
                     f"{len(r['replicas']) or 1} |")
    return lines


def loop_ratios(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["system"], r["workload"]): r for r in rows}
    lines = []
    for load in ("L1 hits", "retrieve"):
        base, ray, two = by.get(("serve", load)), by.get(("ray", load)), by.get(("ray-2", load))
        if base and ray:
            d = {k: ray[k] - base[k] for k in ("p50_ms", "p99_ms", "server_cpu_ms")}
            lines.append(
                f"- (a) {load}, Ray path minus `ragserve serve`, per request: p50 {d['p50_ms']:+.1f} ms, "
                f"p99 {d['p99_ms']:+.1f} ms, service time (1/throughput) "
                f"{1e3 / ray['req_s'] - 1e3 / base['req_s']:+.2f} ms, "
                f"server CPU {d['server_cpu_ms']:+.2f} ms; "
                f"requests/s ray / serve = **{ray['req_s'] / base['req_s']:.2f}×**")
        if ray and two:
            lines.append(f"- (b) {load}, 2 vs 1 ingress replicas: requests/s "
                         f"**{two['req_s'] / ray['req_s']:.2f}×**, "
                         f"p50 {ray['p50_ms']:.1f} → {two['p50_ms']:.1f} ms, p99 {ray['p99_ms']:.1f} → "
                         f"{two['p99_ms']:.1f} ms")
    return lines


def miss_ratios(summaries: list[dict[str, Any]]) -> list[str]:
    at = {s["system"]: s for s in summaries}
    lines = []
    for label, name, target in (("(c) Ray generator deployment", "ray", 0.9),
                                ("(d) `openai` backend", "openai", None)):
        s = at.get(name)
        for base in ("serve", "in-process"):
            b = at.get(base)
            if s and b and b["req_s"]:
                r = s["req_s"] / b["req_s"]
                goal = f" (target ≥ {target}: {'met' if r >= target else 'NOT met'})" if target else ""
                lines.append(f"- {label} vs {base}: requests/s **{r:.2f}×**{goal}; p50 {s['p50_s']:.2f} vs "
                             f"{b['p50_s']:.2f} s, p95 {s['p95_s']:.2f} vs {b['p95_s']:.2f} s")
    for s in summaries:
        st = s["stages_ms"]
        if "generate" in st:
            engine = sum(st.get(k, 0.0) for k in ENGINE_STAGES)
            lines.append(f"- {s['system']}: mean `generate` {st['generate']:.0f} ms, of which vLLM's queue + "
                         f"prefill + decode {engine:.0f} ms: {st['generate'] - engine:.1f} ms around it "
                         f"({AROUND.get(s['system'], 'the hop to the engine')})")
    return lines


def write_report(args: argparse.Namespace, machine: dict[str, Any], index_note: str, systems: dict[str, Any],
                 loops: list[dict[str, Any]], runs: list[Run]) -> None:
    summaries = [r.summary() for r in runs]
    page = ["# Ray serving benchmark (issue 12, (a)-(d))", "", *harness.run_lines(machine),
            f"- index: {index_note}; generation: max_tokens {args.max_tokens}, greedy; embed.threads "
            f"{args.embed_threads or 'auto'}; Ray: 3 logical CPUs, generator 2, ingress replicas 0.5 each",
            f"- hit / retrieval runs: {args.requests} requests from {args.concurrency} keep-alive clients "
            f"(httpx, this process); {args.hot} hot questions, L1 warmed on every replica; retrieval over "
            "distinct XQuAD questions",
            f"- miss runs: {args.miss_requests} distinct XQuAD questions at C={args.miss_concurrency}, "
            f"answer cache off per request, {args.warmup} warm-up requests and an emptied prefix cache "
            "before each", ""]
    page += ["| system | what | up in s | threads of the model processes | error |", "|---|---|---:|---|---|"]
    page += [f"| {n} | {s.get('description', '')} | {s.get('start_s', 0):.0f} | {s.get('threads', '')} | "
             f"{s.get('error', '')} |" for n, s in systems.items()]
    page += ["", "## (a), (b): L1 hits and retrieval-only requests", "", *loop_table(loops), "",
             *loop_ratios(loops), "",
             "With C clients in a closed loop, latency is about C / throughput: on 2 cores shared by the "
             "clients and the server, the per-request service time (1/throughput) and the server's CPU per "
             "request are the overhead figures; p50/p99 add queueing. Each ingress replica embeds with "
             "one thread (Ray's OMP_NUM_THREADS from its 0.5 CPU), and each replica's micro-batcher sees "
             "its share of the queries (smaller batches).", "",
             "## (c), (d): misses", "", *results_table(summaries), "", *miss_ratios(summaries), "",
             "## CPU of the miss runs", "", *cpu_table(summaries), ""]
    raw = {"args": vars(args), "systems": systems, "loops": loops, "misses": summaries}
    harness.write_report("\n".join(page), args.out / "report.md", args.out / "report.json", raw)
    log(f"wrote {args.out / 'report.md'} and report.json")


def main(argv: list[str] | None = None) -> None:
    asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":  # vLLM's engine spawns processes: the guard is required
    main()
