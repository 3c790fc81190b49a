"""The server under a soak: started and stopped (``ragserve serve``, or ``fake_serve.py``
with ``--fake-generator``; ``harness.launch`` and ``harness.stop``), its process sampled
(RSS, fds, its children's RSS), and what it says about itself (``/ready``, ``/metrics``,
``/v1/stats``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import harness
import httpx
from soak_report import Sample


class Sampler:
    """RSS and fds of one process (the server), and the RSS of its children."""

    def __init__(self, pid: int | None) -> None:
        import psutil

        self.psutil = psutil
        self.proc = psutil.Process(pid) if pid else None

    def sample(self, t_s: float) -> Sample | None:
        if self.proc is None:
            return None
        ps = self.psutil
        try:
            rss, fds = self.proc.memory_info().rss, self.proc.num_fds()
            children = self.proc.children(recursive=True)
        except ps.Error:
            return None
        engine = redis = 0
        for c in children:
            try:
                mem = c.memory_info().rss
                if "redis" in c.name():
                    redis += mem
                else:
                    engine += mem
            except ps.Error:  # a child that ended between the listing and the read
                continue
        return Sample(t_s, rss, engine, redis, fds, len(children))


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await client.get("/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{client.base_url} is not ready after {timeout_s:.0f} s")
        await asyncio.sleep(0.5)


async def l1_size(client: httpx.AsyncClient) -> tuple[int, int] | None:
    """(bytes, entries) of the server's L1 answer cache from ``/v1/stats`` (None: no cache)."""
    try:
        r = await client.get("/v1/stats")
        l1 = ((r.json().get("cache") or {}).get("l1") or {}) if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return None
    return (int(l1["bytes"]), int(l1["entries"])) if "bytes" in l1 else None


async def engine_held(client: httpx.AsyncClient) -> int | None:
    """``ragserve_engine_unfinished_requests`` from ``/metrics`` (None if not exported)."""
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    for line in r.text.splitlines():
        if line.startswith("ragserve_engine_unfinished_requests "):
            return int(float(line.split()[1]))
    return None


async def settled(url: str, timeout_s: float = 60.0) -> tuple[int | None, int | None]:
    """(requests the server counts in flight, requests vLLM holds) after the run, once both
    are 0 or ``timeout_s`` has passed: what is left then has leaked. (A minute: the aborts of
    the run's last abandoned requests reach a busy engine in their own time; the poll returns
    as soon as both are 0.)"""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while True:
            r = await client.get("/v1/stats")
            n = r.json().get("gauges", {}).get("in_flight", {}).get("current") if r.status_code == 200 else None
            held = await engine_held(client)
            if (not n and not held) or time.monotonic() > deadline:
                return n, held
            await asyncio.sleep(0.25)


# -- a server of its own ----------------------------------------------------------------------


def start_server(index: Path, tmp: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str, Path]:
    """``ragserve serve INDEX`` on 127.0.0.1, port 0, ``RAGSERVE_HOME`` in ``tmp``; its output
    goes to a file (a pipe nobody reads would fill up and stall it). ``--fake-generator``:
    ``fake_serve.py`` instead (the same server over a stand-in generator, no vLLM)."""
    ready, log_path = tmp / "ready", tmp / "server.log"
    env = {**os.environ, "RAGSERVE_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAGSERVE_GENERATE_MAX_TOKENS": str(args.max_tokens),
           "RAGSERVE_VLLM_KV_CACHE_GIB": str(args.kv_cache_gib)}
    if args.fake_generator:
        command = [str(harness.SCRIPTS / "fake_serve.py"), str(index), "--tokens", str(args.max_tokens),
                   "--step-ms", str(args.fake_step_ms), "--embedder", "stand-in" if args.fake_embedder else "real"]
    else:
        from ragserve.models.resolve import resolve_generation_model

        # The prepared models live in the user's RAGSERVE_HOME; this one holds only the server's data.
        env["RAGSERVE_GENERATE_MODEL"] = str(resolve_generation_model("default"))
        command = ["-m", "ragserve.cli", "serve", str(index)]
    argv = [sys.executable, *command, "--host", "127.0.0.1", "--port", "0", "--grace", str(args.grace),
            "--ready-file", str(ready)]
    proc, url = harness.launch(argv, env=env, log=log_path, ready=ready, timeout_s=300, poll_s=0.2, cwd=harness.REPO)
    return proc, url, log_path


def stop_server(proc: subprocess.Popen, grace_s: float) -> tuple[int | None, float]:
    """SIGTERM, then wait for the drain; (exit status or None if it had to be killed, seconds)."""
    return harness.stop(proc, grace_s + 60)
