"""What an MCP tool call costs over the native endpoint, measured side by side in one run.

A ``ragserve serve`` process over stand-in models (``scripts/fake_serve.py``: the real
server, drain, L1/L2, metrics; a hashing embedder and a clocked generator) over an index
built here with the fake embedder. One client at a time, so the difference is latency, not
queueing. In rounds, interleaved: ``POST /v1/query`` (httpx2, keep-alive) against the
``answer`` tool, and ``POST /v1/retrieve`` against the ``retrieve`` tool, with the official
``mcp`` SDK's client in both protocol eras (2026-07-28: one POST per call; 2025-11-25: a
session). ``answer`` asks questions already in L1, so the engine's share is the same small
one on both sides and what differs is the HTTP framing and the MCP layers.

Then the server's CPU per call (``/proc/PID/stat``: user + system time of the server
process), kind by kind in blocks of ``--cpu-calls``: less noisy than wall time on a shared
machine, and only the server's side (the SDK client's own work is not in it).

    python benchmarks/bench_mcp.py --calls 300 --out reports/bench_mcp.md
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
from harness import pct

log = harness.logger("bench_mcp")
QUESTIONS = [f"chunk number {i}" for i in range(8)]
KINDS = ("v1_query", "mcp_answer", "mcp_answer_session", "mcp_answer_raw",
         "v1_retrieve", "mcp_retrieve", "mcp_retrieve_session")
RAW_HEADERS = {"Accept": "application/json, text/event-stream", "Mcp-Protocol-Version": "2026-07-28",
               "Mcp-Method": "tools/call"}
"""``mcp_answer_raw``: the 2026-07-28 request the SDK's client sends, posted as plain JSON (no
client-side SDK work: what the server's MCP layers cost)."""


def raw_call(i: int, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "0"},
            "io.modelcontextprotocol/clientCapabilities": {}}
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": meta}}


def build(folder: Path) -> Path:
    from ragserve.build.builder import build_index
    from ragserve.config import RAGConfig
    from ragserve.testing.fakes import FakeEmbedder

    src = folder / "docs"
    src.mkdir(parents=True)
    for i in range(64):
        (src / f"doc{i}.txt").write_text(f"Paragraph {i}: chunk number {i % 8} of the bench corpus.", "utf-8")
    build_index(src, folder / "index", RAGConfig(), embedder=FakeEmbedder())
    return folder / "index"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(url: str, calls: int, pid: int | None = None,
                  cpu_calls: int = 0) -> tuple[dict[str, list[float]], dict[str, float]]:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    times: dict[str, list[float]] = {k: [] for k in KINDS}
    async with httpx2.AsyncClient(base_url=url, timeout=60) as http, \
            httpx2.AsyncClient(timeout=60) as h1, httpx2.AsyncClient(timeout=60) as h2, \
            Client(streamable_http_client(f"{url}/mcp", http_client=h1)) as modern, \
            Client(streamable_http_client(f"{url}/mcp", http_client=h2), mode="legacy") as legacy:
        await modern.list_tools()
        await legacy.list_tools()
        for q in QUESTIONS:  # every question in L1 before timing
            (await http.post("/v1/query", json={"question": q})).raise_for_status()

        async def timed(key: str, work: Any) -> None:
            t = time.perf_counter()
            r = await work
            times[key].append(time.perf_counter() - t)
            if getattr(r, "is_error", False) or getattr(r, "status_code", 200) != 200 or \
                    (key.endswith("_raw") and "result" not in r.json()):
                raise SystemExit(f"{key} failed: {r}")

        def call(kind: str, i: int) -> Any:
            q = QUESTIONS[i % len(QUESTIONS)]
            return {
                "v1_query": lambda: http.post("/v1/query", json={"question": q}),
                "mcp_answer": lambda: modern.call_tool("answer", {"question": q}),
                "mcp_answer_session": lambda: legacy.call_tool("answer", {"question": q}),
                "mcp_answer_raw": lambda: http.post("/mcp", json=raw_call(i, "answer", {"question": q}),
                                                    headers=RAW_HEADERS | {"Mcp-Name": "answer"}),
                "v1_retrieve": lambda: http.post("/v1/retrieve", json={"question": q, "top_k": 3}),
                "mcp_retrieve": lambda: modern.call_tool("retrieve", {"question": q, "top_k": 3}),
                "mcp_retrieve_session": lambda: legacy.call_tool("retrieve", {"question": q, "top_k": 3}),
            }[kind]()

        for i in range(calls + 20):  # the first 20 rounds warm up and are dropped
            for kind in KINDS:
                await timed(kind, call(kind, i))
        cpu_ms: dict[str, float] = {}
        for kind in KINDS if pid is not None and cpu_calls else ():
            before = process_cpu_s(pid)
            for i in range(cpu_calls):
                await timed(kind, call(kind, i))
            # (these calls' wall times are not kept: the interleaved rounds above are the latency)
            cpu_ms[kind] = (process_cpu_s(pid) - before) * 1e3 / cpu_calls
    return {k: v[20:calls + 20] for k, v in times.items()}, cpu_ms


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--calls", type=int, default=300, help="timed calls of each kind")
    ap.add_argument("--cpu-calls", type=int, default=300, help="calls of each kind, in a block, for the "
                                                               "server's CPU per call (0: skip)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    env = harness.environment("mcp", gpu=False)
    work = Path(tempfile.mkdtemp(prefix="bench-mcp-"))
    index = build(work)
    proc, url = harness.launch([sys.executable, str(harness.REPO / "scripts" / "fake_serve.py"), str(index),
                                "--port", "0", "--ready-file", str(work / "port"), "--tokens", "8"],
                               env={**os.environ, "RAGSERVE_HOME": str(work / "home")},
                               log=work / "server.log", ready=work / "port")
    try:
        times, cpu_ms = asyncio.run(measure(url, args.calls, proc.pid, args.cpu_calls))
    finally:
        harness.stop(proc, 60)
    ms = {k: (pct(v, 50) * 1e3, pct(v, 95) * 1e3) for k, v in times.items()}
    lines = ["# MCP tool calls against the native endpoint", "", *harness.run_lines(env), "",
             f"One client, {args.calls} timed calls of each kind, interleaved; `answer`: L1 hits.", "",
             f"Server CPU: {args.cpu_calls} calls of each kind in a block, the server process's user + "
             "system time per call.", "",
             "| call | p50 ms | p95 ms | p50 over native, ms | server CPU ms/call | over native |",
             "|---|---|---|---|---|---|"]

    def cpu(kind: str) -> str:
        return f"{cpu_ms[kind]:.2f}" if kind in cpu_ms else "-"

    for native, tools in (("v1_query", ("mcp_answer", "mcp_answer_session", "mcp_answer_raw")),
                          ("v1_retrieve", ("mcp_retrieve", "mcp_retrieve_session"))):
        lines.append(f"| `{native}` | {ms[native][0]:.2f} | {ms[native][1]:.2f} | | {cpu(native)} | |")
        for t in tools:
            extra = f"{cpu_ms[t] - cpu_ms[native]:+.2f}" if t in cpu_ms else "-"
            lines.append(f"| `{t}` | {ms[t][0]:.2f} | {ms[t][1]:.2f} | {ms[t][0] - ms[native][0]:+.2f} | "
                         f"{cpu(t)} | {extra} |")
    harness.write_report("\n".join(lines), md=args.out, data={"times": times, "server_cpu_ms": cpu_ms})


if __name__ == "__main__":
    main()
