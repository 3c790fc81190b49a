"""Retrieve-only requests/s through ``ragserve serve --ray`` over one sharded index, its
shards held by 1 shard actor (``ray.shards_per_actor`` = N) against N shard actors (one
shard each), in one run.

The index: ``--vectors`` seeded synthetic chunks (384-d, flat-fp16) written as an N-shard set
by ``bench_ray_shards.write_indexes`` (the index writer; recorded as built with the default
MiniLM, so the ingress embeds the questions with the real model and searches these
vectors). The questions: XQuAD's (``--xquad``, ``load_dataset``), distinct, cycled.

Each system is ``ragserve serve INDEX --ray`` (``ServerProcess``) on a local cluster the
command starts (``--cluster-cpus`` logical CPUs), one ingress replica, the ``openai`` backend
on an in-process fake server (retrieval never calls it), one Redis for L2. Its load:
``--clients`` concurrent httpx clients in a closed loop posting ``/v1/retrieve`` (top-10),
after ``--warmup`` requests, until ``--requests`` requests or ``--seconds`` (whichever comes
first). Systems run one after the other, in the order 1, N, 1, N... for ``--rounds`` rounds,
each on its own cluster; the load average and the machine's busy share over each run are in
the table.

A benchmark, not a test: the machine is shared; compare within one run. The CPU, versions
and load average are at the top of the report.

Usage:
    python benchmarks/bench_ray_shards_http.py --vectors 20000 --shards 4 --clients 8
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
from bench_ray_shards import DIM, write_indexes
from bench_scale import unit_vectors


def settings(fake_url: str, redis_url: str, args: Any, per_actor: int) -> tuple[dict[str, str], list[str]]:
    """What one ``serve --ray`` adds to this process's environment (``ServerProcess`` starts
    from it; ``RAGSERVE_RAY_ADDRESS=local`` wins over a ``RAY_ADDRESS`` there), and its options."""
    env = {"RAGSERVE_RAY_ADDRESS": "local", "RAGSERVE_RAY_LOCAL_NUM_CPUS": str(args.cluster_cpus),
                "RAGSERVE_RAY_NUM_CPUS": "0.5", "RAGSERVE_RAY_GENERATOR_NUM_CPUS": "0.5",
                "RAGSERVE_RAY_SHARD_REPLICAS": "1", "RAGSERVE_RAY_SHARDS_PER_ACTOR": str(per_actor),
                "RAGSERVE_RAY_SHARD_NUM_CPUS": "0.25",
                "RAGSERVE_GENERATE_BACKEND": "openai", "RAGSERVE_OPENAI_URLS": fake_url,
                "RAGSERVE_OPENAI_TOKENIZER": "server", "RAGSERVE_GENERATE_MAX_TOKENS": "8",
                "RAGSERVE_SERVER_DRAIN_GRACE_S": "5", "HF_HUB_OFFLINE": "1"}
    return env, ["--ray", "--redis-url", redis_url, "--replicas", "1"]


async def load(url: str, questions: list[str], args: Any) -> dict[str, Any]:
    """The closed loop: requests/s, latency percentiles, errors, and the machine's busy share."""
    from harness import CpuSampler

    client = harness.http_client(url, timeout=60.0, connections=args.clients * 2)
    latencies: list[float] = []
    errors: list[str] = []
    deadline = [0.0]

    async def one(q: str) -> None:
        if time.perf_counter() > deadline[0]:
            return
        t = time.perf_counter()
        try:
            body = await harness.post_ok(client, "/v1/retrieve", {"question": q, "top_k": 10})
            if len(body["sources"]) != 10:
                raise RuntimeError(f"{len(body['sources'])} sources")
            latencies.append((time.perf_counter() - t) * 1e3)
        except Exception as e:  # noqa: BLE001 - counted and shown
            errors.append(f"{type(e).__name__}: {str(e)[:120]}")

    try:
        deadline[0] = time.perf_counter() + 120
        await harness.run_clients(questions[:args.warmup], args.clients, one)
        latencies.clear()
        errors.clear()
        sampler = CpuSampler(harness.process_name)
        load_before = os.getloadavg()[0]
        a = sampler.snapshot()
        deadline[0] = time.perf_counter() + args.seconds
        items = [questions[(args.warmup + i) % len(questions)] for i in range(args.requests)]
        wall = await harness.run_clients(items, args.clients, one)
        b = sampler.snapshot()
        cpu = sampler.delta(a, b)
    finally:
        await client.aclose()
    p50, p99 = harness.pcts(latencies, 50, 99)
    return {"requests": len(latencies), "errors": len(errors), "first_errors": errors[:3], "wall_s": wall,
            "rps": len(latencies) / wall if wall else 0.0, "p50_ms": p50, "p99_ms": p99,
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "machine_busy": cpu["machine_s"] / (wall * (os.cpu_count() or 1)) if wall else 0.0}


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--vectors", type=int, default=20_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1000, help="Most requests measured per system.")
    ap.add_argument("--seconds", type=float, default=60.0, help="Most seconds measured per system.")
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cluster-cpus", type=int, default=4)
    ap.add_argument("--xquad", type=Path, default=harness.XQUAD)
    ap.add_argument("--start-timeout", type=float, default=240.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    log = harness.logger("bench_ray_shards_http")
    env = harness.environment("ray", "faiss-cpu", "httpx", gpu=False)

    from ragserve.eval.datasets import load_dataset
    from ragserve.server.process import ServerProcess
    from ragserve.testing.fake_openai import Behaviour, FakeOpenAI
    from ragserve.testing.http import running
    from ragserve.testing.redis import redis_server

    questions = [q.text for q in load_dataset(args.xquad).questions]
    x = unit_vectors(args.vectors, DIM, seed=7, kind="clustered")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        _, index = write_indexes(Path(tmp), x, args.shards)
        log(f"wrote {args.vectors:,} vectors as {args.shards} shards")
        fake = FakeOpenAI(Behaviour(token_delay_s=0.0))
        with redis_server() as redis, running(fake.app) as fake_url:
            for r in range(args.rounds):
                for actors in (1, args.shards):
                    per_actor = args.shards if actors == 1 else 1
                    extra, argv = settings(fake_url, redis.url, args, per_actor)
                    srv = ServerProcess(index, env=extra, args=argv, start_timeout_s=args.start_timeout,
                                        log=Path(tmp) / f"serve-{actors}-{r}.log")
                    t = time.perf_counter()
                    srv.start()
                    try:
                        started = time.perf_counter() - t
                        row = asyncio.run(load(srv.url, questions, args))
                    finally:
                        srv.stop()
                    row.update({"round": r, "actors": actors, "shards_per_actor": per_actor,
                                "start_s": started})
                    rows.append(row)
                    log(f"{actors} shard actor(s): {row['rps']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, "
                        f"{row['errors']} errors {row['first_errors']}")
    lines = ["# Retrieve-only requests/s through `serve --ray`: 1 shard actor against "
             f"{args.shards}", "", *harness.run_lines(env), "",
             f"{args.vectors:,} synthetic chunks (384-d, flat-fp16) in {args.shards} shards; "
             f"`POST /v1/retrieve` (top-10, XQuAD questions, MiniLM in the ingress) from {args.clients} "
             f"concurrent clients, closed loop, at most {args.requests} requests or {args.seconds:g} s per "
             f"system after {args.warmup} warm-up requests. Ray: a local cluster of {args.cluster_cpus} "
             "logical CPUs started by the command, 1 ingress replica (0.5 CPU), the shard actors 0.25 CPU "
             "each, one copy per shard; loopback.", "",
             "| round | shard actors | shards per actor | requests | errors | wall s | requests/s | p50 ms | "
             "p99 ms | load avg before / after | machine busy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        p50, p99 = harness.fmt(w["p50_ms"], ".1f"), harness.fmt(w["p99_ms"], ".1f")
        lines.append(f"| {w['round']} | {w['actors']} | {w['shards_per_actor']} | {w['requests']} | "
                     f"{w['errors']} | {w['wall_s']:.1f} | {w['rps']:.1f} | {p50} | {p99} | "
                     f"{w['load_before']:.2f} / {w['load_after']:.2f} | {w['machine_busy']:.0%} |")
    harness.write_report("\n".join(lines), md=args.out, json_path=args.json,
                         data={"env": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
