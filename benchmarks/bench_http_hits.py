"""The cache-hit path over HTTP, shared by the HTTP benchmarks: a closed loop of keep-alive
clients (``closed_loop``: ``bench_http.py``'s L1 hits, ``bench_ray.py``'s hits and
retrieval-only load) and ``bench_http.py``'s hit-and-overload server."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from typing import Any

import harness
from harness import pct

log = harness.logger("bench")


async def hits_and_overload(args: argparse.Namespace, questions: list[Any],
                            env: dict[str, str]) -> dict[str, Any]:
    """A server with the cache on (L1 + an embedded Redis in a temp folder) and ``env``'s tight
    admission bounds: L1 hits alone and from ``--hit-clients``, then bursts of misses past the bounds."""
    from ragserve.server.process import ServerProcess

    redis_dir = tempfile.mkdtemp(prefix="bench-http-redis-")
    env = {**env, "RAGSERVE_CACHE_REDIS_DIR": redis_dir}
    out: dict[str, Any] = {}
    with ServerProcess(args.index, env=env, log=args.out / "server-cache.log") as srv:
        async with harness.http_client(srv.url, timeout=300, connections=256) as client:
            hot = [q.text for q in questions[:32]]
            for q in hot:  # one at a time: stays inside the admission bounds
                (await client.post("/v1/query", json={"question": q})).raise_for_status()
            out["hits"] = []
            for clients in (1, args.hit_clients):  # alone: the HTTP layer's latency; 64: its throughput
                n = args.hit_requests // (10 if clients == 1 else 1)
                row = await closed_loop(client, "/v1/query", [{"question": q} for q in hot], clients, n)
                out["hits"].append(row)
                log(f"L1 hits over HTTP: {row}")
            bursts = []
            for b in range(2):
                fresh = [q.text for q in questions[32 + b * args.burst: 32 + (b + 1) * args.burst]]

                async def one(q: str) -> tuple[int, float]:
                    t = time.perf_counter()
                    r = await client.post("/v1/query", json={"question": q, "cache": {"read": False}})
                    return r.status_code, time.perf_counter() - t

                bursts += await asyncio.gather(*(one(q) for q in fresh))
            refused = [t for s, t in bursts if s == 429]
            out["overload"] = {"sent": len(bursts), "429": len(refused),
                               "200": sum(s == 200 for s, _ in bursts),
                               "other": sorted({s for s, _ in bursts} - {200, 429}),
                               "p50_ms": pct(refused, 50) * 1e3,
                               "max_ms": max(refused, default=float("nan")) * 1e3}
            log(f"overload: {out['overload']}")
    out["server_exit"] = srv.returncode
    # The client above queues its own burst (one Python process sending 64 at once): the
    # server's own time to refuse is in its access log.
    refused_ms = [float(line.rsplit(" ", 1)[1].rstrip("ms")) for line in srv.tail(10**8).splitlines()
                  if "ragserve.access" in line and " 429 " in line]
    if "overload" in out and refused_ms:
        out["overload"]["server_p50_ms"] = pct(refused_ms, 50)
        out["overload"]["server_p99_ms"] = pct(refused_ms, 99)
        out["overload"]["server_max_ms"] = max(refused_ms)
    return out


async def closed_loop(client: Any, path: str, bodies: list[dict[str, Any]], clients: int,
                      n: int) -> dict[str, Any]:
    """``n`` requests ``POST path`` from ``clients`` keep-alive clients in a closed loop (each
    sends its next request when its last one is answered), cycling through ``bodies``:
    requests/s, client latency p50/p99, the server's own ``timings.total`` where the route
    reports one, and how the answers split by ``X-Cache`` tier and by the replica that
    answered (``X-Ragserve-Replica``, behind Ray Serve). A non-200 is counted, not timed."""
    lat: list[float] = []
    server_ms: list[float] = []
    tiers: dict[str, int] = {}
    replicas: dict[str, int] = {}
    errors: dict[int, int] = {}

    async def one(i: int) -> None:
        t = time.perf_counter()
        r = await client.post(path, json=bodies[i % len(bodies)])
        if r.status_code != 200:
            errors[r.status_code] = errors.get(r.status_code, 0) + 1
            return
        lat.append(time.perf_counter() - t)
        for seen, header in ((tiers, "x-cache"), (replicas, "x-ragserve-replica")):
            if (value := r.headers.get(header)) is not None:
                seen[value] = seen.get(value, 0) + 1
        if (total := r.json().get("timings", {}).get("total")) is not None:
            server_ms.append(total)

    wall = await harness.run_clients(range(n), clients, one)
    return {"requests": n, "clients": clients, "errors": errors, "wall_s": wall, "req_s": len(lat) / wall,
            "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "server_p50_ms": pct(server_ms, 50),
            "tiers": tiers, "replicas": replicas}
