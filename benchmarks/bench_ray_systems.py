"""The systems ``bench_ray.py`` compares, brought up one at a time (at most one vLLM engine
runs at any moment), each behind the interface ``bench_serving.measure`` drives (``run``,
``reset_prefix_cache``, ``server_metrics``, ``overlap``) plus ``client`` (HTTP) and ``pids``:

- ``serve``: ``ragserve serve`` (``ServerProcess``): the pipeline and ragserve's own vLLM
  ``AsyncLLM`` in one process, HTTP on loopback;
- ``ray``: ``ragserve serve --ray``, 1 ingress replica and the generator deployment (vLLM in
  its replica), on the local Ray cluster the command starts (2 CPUs, no dashboard) and
  shuts down when it stops;
- ``ray-2``: the same with 2 ingress replicas;
- ``openai``: ``ragserve serve`` with the ``openai`` backend pointed at vLLM's own OpenAI
  server (``bench_serving_peer.PeerServer``, same engine settings), started here;
- ``in-process``: ``RAG.from_index`` in this process, ``rag.aquery`` (no HTTP at all).

Every one gets the same ``RAGSERVE_*`` settings (``bench_ray.settings``) and the same Redis.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import harness
import psutil
from bench_serving_report import Record
from harness import process_tree

# name -> (what it is, the runs it takes part in)
SYSTEMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "serve": ("`ragserve serve` (pipeline + vLLM AsyncLLM in one process)", ("hits", "retrieve", "misses")),
    "ray": ("`ragserve serve --ray`, 1 ingress replica + the generator deployment",
            ("hits", "retrieve", "misses")),
    "ray-2": ("`ragserve serve --ray`, 2 ingress replicas + the generator deployment", ("hits", "retrieve")),
    "openai": ("`ragserve serve`, `openai` backend → vLLM's OpenAI server on loopback", ("misses",)),
    "in-process": ("`rag.aquery` in the benchmark process (vLLM AsyncLLM, no HTTP)", ("misses",)),
}


def title(pid: int) -> str:
    """A process's name for the CPU table: Ray's worker titles (``ray::ServeReplica:...``),
    vLLM's (``VLLM::EngineCore``), else the program."""
    try:
        p = psutil.Process(pid)
        argv = p.cmdline()
    except psutil.Error:
        return "exited"
    first = argv[0] if argv else p.name()
    if first.startswith(("ray::", "VLLM::")):
        return first.split(" ")[0]
    if "-m" in argv[:3]:
        return argv[argv.index("-m") + 1]
    return Path(first).name


MODEL_PROGRAMS = ("ragserve.cli", "vllm.entrypoints.openai.api_server")


def thread_notes(pids: set[int]) -> str:
    """Threads of the processes that run models (vLLM's engine core, Ray Serve replicas) and
    their OMP_NUM_THREADS: Ray would set it to floor(num_cpus) in each replica."""
    seen = {}
    for pid in pids:
        name = title(pid)
        if "EngineCore" in name or "ServeReplica" in name or name in MODEL_PROGRAMS:
            try:
                p = psutil.Process(pid)
                # NOTE: /proc's environ is the one at exec: vLLM's spawned engine core gets its
                # OMP_NUM_THREADS later (its log says "leaving Torch threads at N"), so not shown
                omp = "" if "EngineCore" in name else \
                    f" OMP_NUM_THREADS={p.environ().get('OMP_NUM_THREADS', 'unset')}"
                seen.setdefault(name + omp, []).append(p.num_threads())
            except psutil.Error:
                continue
    return "; ".join(f"{k} ({'/'.join(map(str, v))} threads)" for k, v in sorted(seen.items())) or "—"


class System:
    """One system: ``start``, the measured calls, ``stop``. ``replicas``: ingress replicas
    (whose L1s the hit run warms one by one)."""

    def __init__(self, name: str, args: Any, env: dict[str, str], workload: Any, log: Any) -> None:
        self.name, self.args, self.env, self.workload, self.log = name, args, env, workload, log
        self.description, self.runs = SYSTEMS[name]
        self.replicas = 2 if name == "ray-2" else 1
        self.start_s = 0.0
        self.client: Any = None
        self.srv: Any = None
        self.peer: Any = None
        self.rag: Any = None
        self.threads = ""

    # -- up and down ----------------------------------------------------------------------

    async def start(self) -> None:
        from ragserve.server.process import ServerProcess

        a, t = self.args, time.perf_counter()
        if self.name == "in-process":
            from ragserve import RAG, RAGConfig

            cfg = RAGConfig.load(env={**os.environ, **self.env})
            self.rag = await asyncio.to_thread(RAG.from_index, a.index, cfg)
            # blocking first: it starts vLLM's output handler on ragserve's engine loop (as bench_serving)
            await asyncio.to_thread(self.rag.query, self.workload.warmup[0].text, cache_read=False,
                                    cache_write=False)
        else:
            env, argv = dict(self.env), []
            if self.name.startswith("ray"):
                argv = ["--ray", "--redis-url", env["RAGSERVE_REDIS_URL"], "--replicas", str(self.replicas)]
            if self.name == "openai":
                await self._start_peer(env)
            self.srv = ServerProcess(a.index, env=env, args=argv, log=a.out / f"server-{self.name}.log",
                                     start_timeout_s=a.start_timeout)
            await asyncio.to_thread(self.srv.start)
            self.client = harness.http_client(self.srv.url, timeout=a.request_timeout, connections=512)
        self.start_s = time.perf_counter() - t
        self.threads = thread_notes(self.pids())
        self.log(f"{self.name} up in {self.start_s:.0f} s; {self.threads}")

    async def _start_peer(self, env: dict[str, str]) -> None:
        from bench_serving_peer import PeerServer

        from ragserve import RAGConfig
        from ragserve.models.resolve import resolve_generation_model

        cfg = RAGConfig.load(env={**os.environ, **env})
        model = resolve_generation_model(cfg.generate.model)
        self.peer = PeerServer(model, cfg, self.args.out / "peer_server.log")
        await asyncio.to_thread(self.peer.start)
        env.update(RAGSERVE_GENERATE_BACKEND="openai", RAGSERVE_OPENAI_URLS=self.peer.base)
        self.log(f"vLLM's OpenAI server up at {self.peer.base} in {self.peer.start_s:.0f} s")

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.srv is not None:
            await asyncio.to_thread(self.srv.stop, 180.0)
            # vLLM's engine core and Ray's processes are in the server's process group and exit
            # a moment after it: wait for them, so that no engine outlives its system
            if not await harness.until(lambda: not self.srv.group_alive(), 30.0):
                self.log(f"{self.name}: processes left 30 s after the server stopped; killing its group")
                await asyncio.to_thread(self.srv.kill)
        if self.peer is not None:
            await asyncio.to_thread(self.peer.stop)
        if self.rag is not None:
            await asyncio.to_thread(self.rag.close)

            def engines() -> list[int]:
                kids = psutil.Process().children(recursive=True)
                return [c.pid for c in kids if "EngineCore" in title(c.pid)]

            if not await harness.until(lambda: not engines(), 30.0):
                self.log(f"in-process: vLLM engine still running 30 s after rag.close(): {engines()}")

    def pids(self) -> set[int]:
        if self.rag is not None:
            return process_tree(os.getpid()) - {os.getpid()}  # the engine core; this process is counted apart
        return (process_tree(self.srv.pid) if self.srv is not None and self.srv.proc is not None else set()) | \
            (self.peer.pids() if self.peer is not None else set())

    def label(self, pid: int) -> str:
        if pid == os.getpid():
            return "bench process (clients" + (", pipeline, vLLM client)" if self.rag is not None else ")")
        if self.srv is not None and self.srv.proc is not None and pid == self.srv.pid:
            return "ragserve serve" + (" --ray (driver)" if self.name.startswith("ray") else "")
        if self.peer is not None and self.peer.proc is not None and pid == self.peer.proc.pid:
            return "vLLM OpenAI server"
        return title(pid)

    # -- what bench_serving.measure calls -------------------------------------------------

    async def run(self, name: str, qs: list[Any], c: int, drive: Any, timeout_s: float) -> Any:
        return await drive(qs, c, self._inprocess_one if self.rag is not None else self._http_one, timeout_s)

    async def reset_prefix_cache(self, name: str) -> None:
        if self.rag is None:
            await harness.reset_prefix_cache(self.client, admin_key=self.env["RAGSERVE_SERVER_ADMIN_KEY"],
                                             what=self.name)
        elif not await asyncio.to_thread(self.rag.reset_prefix_cache):
            raise RuntimeError(f"{self.name}: vLLM's prefix cache was not reset")

    async def server_metrics(self, name: str) -> None:
        return None

    def overlap(self, name: str, qs: list[Any], records: list[Record]) -> None:
        return None

    async def _http_one(self, i: int, q: Any) -> Record:
        body = {"question": q.text, "cache": {"read": False, "write": False}}
        return Record.of_json(i, await harness.post_ok(self.client, "/v1/query", body))

    async def _inprocess_one(self, i: int, q: Any) -> Record:
        return Record.of_result(i, await self.rag.aquery(q.text, cache_read=False, cache_write=False))


async def warm_l1(client: Any, bodies: list[dict[str, Any]], replicas: int, concurrency: int,
                  attempts: int = 60) -> dict[str, int]:
    """Ask each question until every ingress replica has answered it (Serve's router picks
    the replica; ``X-Ragserve-Replica`` names it). The first answer is a miss (generated,
    written to that replica's L1 and to Redis); on every other replica the first answer is
    an L2 hit, which fills that replica's L1: after this, every replica answers every
    question from its own L1. Returns the tiers seen while warming."""
    tiers: dict[str, int] = {}
    gate = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> None:
        seen: set[str] = set()
        for _ in range(attempts):
            async with gate:
                r = await client.post("/v1/query", json=body)
            r.raise_for_status()
            tiers[r.headers.get("x-cache", "?")] = tiers.get(r.headers.get("x-cache", "?"), 0) + 1
            seen.add(r.headers.get("x-ragserve-replica", "the server"))
            if len(seen) >= replicas:
                return
        raise RuntimeError(f"{body['question']!r} reached {len(seen)} of {replicas} replicas "
                           f"in {attempts} tries")

    await one(bodies[0])  # one generation first: the rest then batch in a warm engine
    await asyncio.gather(*(one(b) for b in bodies[1:]))
    return tiers
