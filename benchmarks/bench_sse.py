"""What streaming over HTTP costs per token: ``ragserve serve`` (SSE) against in-process
``rag.astream``, side by side in ONE run, over STAND-IN models (``fake_serve.py``): no vLLM,
so what differs between the systems is the HTTP layer alone, not the engine's noise.

The generator gives every running request its next piece once per ``--step-ms`` (one
clock, as vLLM's engine steps do); ``--tokens`` pieces per answer; cache off; C requests
kept in flight for ``--seconds`` per system and round; the systems rotate their order each
round. Systems:

- ``in-process``: ``rag.astream`` in this process (the pipeline, the hop from the engine's
  loop to this one, no HTTP);
- ``HTTP native``: ``POST /v1/query`` with ``"stream": true`` through httpx, lines parsed as
  ``bench_http.py`` does; the ``token`` texts must add up to the ``done`` answer;
- ``HTTP OpenAI``: ``POST /v1/chat/completions`` with ``"stream": true`` through httpx; the
  deltas must add up to the answer and the stream must end with ``data: [DONE]``.

Reported: requests/s and its ratio to in-process (issue 11's target at C=32: ≥ 0.95), time
to first token at the client (p50/p95), token frames per request (fewer than ``--tokens``
when pieces were coalesced), and CPU ms per request: the server's main thread (uvicorn's
loop: the HTTP layer), its other threads (the engine loop: the pipeline), and this process
(the clients; for in-process, the pipeline too). On a 2-core machine shared with vLLM, CPU
the HTTP layer spends is taken from vLLM.
A small ``--step-ms`` (1–2) makes the per-token cost the limit; 20 is nearer vLLM on CPU.

Run (an index folder is needed for its chunks; keep a run within a minute):

    python benchmarks/bench_sse.py --index indexes/xquad --concurrency 32 --tokens 64 --step-ms 20
    python benchmarks/bench_sse.py --index indexes/xquad --step-ms 1 --seconds 6 --rounds 2

A benchmark, not a test: it asserts only that the streams are well formed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np
from harness import pct

SYSTEMS = ("in-process", "HTTP native", "HTTP OpenAI")


def parse_args() -> argparse.Namespace:
    ap = harness.parser(__doc__, raw=False)
    ap.add_argument("--index", type=Path, default=harness.XQUAD_INDEX)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=8.0, help="per system and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    return ap.parse_args()


def start_server(args: argparse.Namespace, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = tmp / "port"
    env = {**os.environ, "RAGSERVE_HOME": str(tmp / "home"), "RAGSERVE_CACHE_ENABLED": "false",
           "RAGSERVE_QUERY_MAX_IN_FLIGHT": str(max(64, args.concurrency))}
    argv = [sys.executable, str(harness.SCRIPTS / "fake_serve.py"), str(args.index), "--ready-file", str(ready),
            "--tokens", str(args.tokens), "--step-ms", str(args.step_ms)]
    return harness.launch(argv, env=env, log=tmp / "server.log", ready=ready, timeout_s=60, what="fake_serve")


class Client:
    """One request of each system; returns (time to first token s, token frames)."""

    def __init__(self, url: str, rag: Any) -> None:
        self.url = url
        self.rag = rag
        self.http: Any = None

    def connections(self) -> Any:
        """A new pool per run of a system: uvicorn closes connections idle for 5 s, and one
        closed while the client reuses it fails the request (httpx.ReadError)."""
        self.http = harness.http_client(self.url, timeout=120)
        return self.http

    async def one(self, system: str, question: str) -> tuple[float, int]:
        return await {"in-process": self.inprocess, "HTTP native": self.native,
                      "HTTP OpenAI": self.openai}[system](question)

    async def inprocess(self, question: str) -> tuple[float, int]:
        ttft, parts, result = await harness.stream_inprocess(self.rag, question)
        _check("".join(parts), result.answer)
        return ttft or 0.0, len(parts)

    async def native(self, question: str) -> tuple[float, int]:
        ttft, tokens, done = await harness.stream_query(self.http, {"question": question})
        parts = [json.loads(data)["text"] for data in tokens]
        _check("".join(parts), done["answer"])
        return ttft or 0.0, len(parts)

    async def openai(self, question: str) -> tuple[float, int]:
        t0, ttft, parts, finished, done = time.perf_counter(), None, [], False, False
        body = {"model": "ragserve", "stream": True, "messages": [{"role": "user", "content": question}]}
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                assert chunk["object"] == "chat.completion.chunk", chunk
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        parts.append(choice["delta"]["content"])
                    finished = finished or choice["finish_reason"] is not None
        if not (finished and done):
            raise RuntimeError("the chat stream ended without its finish chunk and [DONE]")
        return ttft or 0.0, len(parts)


def _check(text: str, answer: str | None) -> None:
    if answer is None or text != answer:
        raise RuntimeError(f"the token texts do not add up to the answer: {text[:60]!r} vs {str(answer)[:60]!r}")


async def drive(client: Client, system: str, c: int, seconds: float, server_pid: int) -> dict[str, Any]:
    import psutil

    server = psutil.Process(server_pid)
    ttfts: list[float] = []
    frames: list[int] = []
    n = iter(range(10**9))
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            ttft, f = await client.one(system, f"question {next(n)}: what does the stand-in say?")
            ttfts.append(ttft)
            frames.append(f)

    def threads() -> tuple[float, float]:
        """CPU-s of the server's main thread (uvicorn's loop: HTTP) and of its others (the
        engine loop, the embedding thread)."""
        times = {t.id: t.user_time + t.system_time for t in server.threads()}
        main = times.pop(server_pid, 0.0)
        return main, sum(times.values())

    async with client.connections():
        (http0, engine0), cpu_self, t0 = threads(), time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - t0
    done = len(ttfts)
    http1, engine1 = threads()
    if not done:  # a starved machine: not one request ended in time
        return {"system": system, "requests": 0, "req_s": 0.0, **dict.fromkeys(
            ("ttft_p50_ms", "ttft_p95_ms", "frames", "server_http_cpu_ms", "server_engine_cpu_ms", "self_cpu_ms"),
            float("nan"))}
    return {"system": system, "requests": done, "req_s": done / wall,
            "ttft_p50_ms": pct(ttfts, 50) * 1e3, "ttft_p95_ms": pct(ttfts, 95) * 1e3,
            "frames": float(np.mean(frames)),
            "server_http_cpu_ms": (http1 - http0) / done * 1e3, "server_engine_cpu_ms": (engine1 - engine0) / done * 1e3,
            "self_cpu_ms": (time.process_time() - cpu_self) / done * 1e3}


async def main_async(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(harness.SCRIPTS))
    import fake_serve

    from ragserve import RAG, RAGConfig

    systems = [s.strip() for s in args.systems.split(",")]
    cfg = RAGConfig.load().replace(cache={"enabled": False}, query={"max_in_flight": max(64, args.concurrency)})
    rag = RAG.from_index(args.index, cfg, embedder=fake_serve.StandInEmbedder(args.index),
                         generator=fake_serve.PacedGenerator(args.tokens, args.step_ms / 1e3))
    env = harness.environment(gpu=False)  # before the run: the machine's load average
    with tempfile.TemporaryDirectory(prefix="bench-sse-") as tmp:
        proc, url = start_server(args, Path(tmp))
        client = Client(url, rag)
        rows: list[dict[str, Any]] = []
        try:
            for s in systems:  # warm-up: connections, first requests
                await drive(client, s, args.concurrency, 1.0, proc.pid)
            for r in range(args.rounds):
                for s in systems[r % len(systems):] + systems[: r % len(systems)]:
                    rows.append(await drive(client, s, args.concurrency, args.seconds, proc.pid))
                    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                          flush=True)
        finally:
            harness.stop(proc, 60)
            rag.close()
    report(args, env, rows)


def report(args: argparse.Namespace, env: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    import ragserve

    machine, versions = harness.machine_lines(env)
    print(f"\n# SSE overhead over stand-in models\n\n- {machine}\n- {versions}; ragserve from "
          f"{Path(ragserve.__file__).parent.parent}\n- C={args.concurrency}, {args.tokens} pieces per answer, one per "
          f"{args.step_ms:g} ms step, {args.rounds} rounds × {args.seconds:g} s per system, cache off\n")
    print("| system | requests | req/s | × in-process | TTFT p50 / p95 ms | token frames per request | server CPU ms "
          "per request: HTTP loop / engine threads | this process's CPU ms per request |\n"
          "|---|---:|---:|---:|---|---:|---|---:|")
    base = _mean(rows, "in-process", "req_s")
    for s in dict.fromkeys(r["system"] for r in rows):
        got = [r for r in rows if r["system"] == s]
        req_s = _mean(rows, s, "req_s")
        print(f"| {s} | {sum(r['requests'] for r in got)} | {req_s:.2f} | "
              f"{req_s / base:.3f} | {_mean(rows, s, 'ttft_p50_ms'):.1f} / {_mean(rows, s, 'ttft_p95_ms'):.1f} | "
              f"{_mean(rows, s, 'frames'):.1f} | {_mean(rows, s, 'server_http_cpu_ms'):.2f} / "
              f"{_mean(rows, s, 'server_engine_cpu_ms'):.2f} | "
              f"{_mean(rows, s, 'self_cpu_ms'):.2f} |")


def _mean(rows: list[dict[str, Any]], system: str, key: str) -> float:
    vals = [r[key] for r in rows if r["system"] == system]
    return float(np.mean(vals)) if vals else float("nan")


if __name__ == "__main__":
    asyncio.run(main_async(parse_args()))
