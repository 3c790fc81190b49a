"""What an MCP tool call costs over the native endpoint, measured side by side in one run.

A ``ragserve serve`` process over stand-in models (``scripts/fake_serve.py``: the real
server, drain, L1/L2, metrics; a hashing embedder and a clocked generator) over an index
built here with the fake embedder. One client at a time, so the difference is latency, not
queueing. In rounds, interleaved: ``POST /v1/query`` (httpx2, keep-alive) against the
``answer`` tool, and ``POST /v1/retrieve`` against the ``retrieve`` tool, with the official
``mcp`` SDK's client in both protocol eras (2026-07-28: one POST per call; 2025-11-25: a
session). ``answer`` asks questions already in L1, so the engine's share is the same small
one on both sides and what differs is the HTTP framing and the MCP layers.

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


async def measure(url: str, calls: int) -> dict[str, list[float]]:
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

        for i in range(calls + 20):  # the first 20 rounds warm up and are dropped
            q = QUESTIONS[i % len(QUESTIONS)]
            await timed("v1_query", http.post("/v1/query", json={"question": q}))
            await timed("mcp_answer", modern.call_tool("answer", {"question": q}))
            await timed("mcp_answer_session", legacy.call_tool("answer", {"question": q}))
            await timed("mcp_answer_raw", http.post("/mcp", json=raw_call(i, "answer", {"question": q}),
                                                    headers=RAW_HEADERS | {"Mcp-Name": "answer"}))
            await timed("v1_retrieve", http.post("/v1/retrieve", json={"question": q, "top_k": 3}))
            await timed("mcp_retrieve", modern.call_tool("retrieve", {"question": q, "top_k": 3}))
            await timed("mcp_retrieve_session", legacy.call_tool("retrieve", {"question": q, "top_k": 3}))
    return {k: v[20:] for k, v in times.items()}


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--calls", type=int, default=300, help="timed calls of each kind")
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
        times = asyncio.run(measure(url, args.calls))
    finally:
        harness.stop(proc, 60)
    ms = {k: (pct(v, 50) * 1e3, pct(v, 95) * 1e3) for k, v in times.items()}
    lines = ["# MCP tool calls against the native endpoint", "", *harness.run_lines(env), "",
             f"One client, {args.calls} timed calls of each kind, interleaved; `answer`: L1 hits.", "",
             "| call | p50 ms | p95 ms | p50 over native, ms |", "|---|---|---|---|"]
    for native, tools in (("v1_query", ("mcp_answer", "mcp_answer_session", "mcp_answer_raw")),
                          ("v1_retrieve", ("mcp_retrieve", "mcp_retrieve_session"))):
        lines.append(f"| `{native}` | {ms[native][0]:.2f} | {ms[native][1]:.2f} | |")
        for t in tools:
            lines.append(f"| `{t}` | {ms[t][0]:.2f} | {ms[t][1]:.2f} | {ms[t][0] - ms[native][0]:+.2f} |")
    harness.write_report("\n".join(lines), md=args.out, data=times)


if __name__ == "__main__":
    main()
