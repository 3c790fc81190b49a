"""HTTP serving benchmark of issue 11: ``ragserve serve`` against ragserve in-process and the
LlamaIndex peer, side by side in ONE run (the machine is noisy: only ratios measured
together mean much).

Misses, at each concurrency C (default 1, 8, 32, 64: C clients keep C requests in flight),
distinct XQuAD questions, answer cache off, the same engine settings everywhere:

- (a) ``HTTP native``: ``ragserve serve`` in its own process on 127.0.0.1, ``POST /v1/query``
  with ``"stream": true`` through httpx (time to first token as the client sees it);
- (b) ``HTTP OpenAI``: the same server through the ``openai`` SDK,
  ``chat.completions.create(stream=True)``;
- (c) ``in-process``: ``rag.astream`` in this process (the pipeline with no HTTP at all);
- (d) ``LlamaIndex``: the peer of ``bench_serving.py`` (LlamaIndex + vLLM's OpenAI server;
  ``make bench-deps`` installs it; non-streaming, so no client-side TTFT).

The HTTP layer's own cost per request is the client's latency minus the ``total`` the
server measured for the same request (parsing, JSON/SSE framing, the hop between the
server's loop and the engine's, loopback TCP). Every system × C starts with a warm-up on
questions no run measures and an emptied vLLM prefix cache (``/admin/reset_prefix_cache``
on the server). Systems rotate their order per level.

Then, on a second server with the answer cache on (L1, embedded Redis in a temp folder)
and tight admission bounds: L1 hits over HTTP at ``--hit-clients`` (64) clients; and a
burst of misses past the bounds, where every refused request must get 429 at once.

Memory over a long mixed run (RSS growth): ``benchmarks/soak.py``.

Run (from the repo root, on an otherwise idle machine; ``make bench-deps`` first for (d)):

    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false python benchmarks/bench_http.py --out reports/http
    python benchmarks/bench_http.py --concurrency 1,8 --questions-per-level 4,16 --skip-peer   # a quick look

A benchmark, not a test: it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import bench_serving as bs
import bench_serving_workload as wl
import harness
import numpy as np
from bench_http_hits import hits_and_overload
from bench_serving_report import Record, Run, cpu_table
from bench_serving_systems import Systems
from harness import CpuSampler, pct

from ragserve.profiling.env import PEER_PACKAGES, header_markdown

SYSTEMS = ("HTTP native", "HTTP OpenAI", "in-process", "LlamaIndex", "HTTP native JSON", "in-process plain")
DEFAULT_SYSTEMS = "HTTP native,HTTP OpenAI,in-process,LlamaIndex"
ADMIN_KEY = "bench-admin-key-0123456789"


def parse_args() -> argparse.Namespace:
    ap = harness.parser(__doc__)
    harness.xquad_arguments(ap, "http")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--questions-per-level", default="8,32,64,128")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stream-interval", type=int, default=None,
                    help="vllm.stream_interval for the server and in-process alike (default: the config's)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--systems", default=DEFAULT_SYSTEMS,
                    help=f"comma-separated, from: {', '.join(SYSTEMS)} (the JSON/plain pair: no streaming, no TTFT)")
    ap.add_argument("--skip-hits", action="store_true", help="leave out the cache-hit and overload server")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--peer-vllm-defaults", action="store_true")
    ap.add_argument("--peer-overlay", type=Path, default=harness.REPO / "build" / "bench-peer")
    ap.add_argument("--hit-clients", type=int, default=64)
    ap.add_argument("--hit-requests", type=int, default=20_000)
    ap.add_argument("--burst", type=int, default=64, help="concurrent misses sent past the admission bounds")
    ap.add_argument("--request-timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.per_level = bs.per_level(ap, args)
    args.systems = [n.strip() for n in args.systems.split(",")]
    if unknown := set(args.systems) - set(SYSTEMS):
        ap.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    args.skip_peer = args.skip_peer or "LlamaIndex" not in args.systems
    return args


def server_env(args: argparse.Namespace, **extra: str) -> dict[str, str]:
    """The server's settings: the in-process engine's, by env (``RAGSERVE_<SECTION>_<FIELD>``)."""
    interval = {} if args.stream_interval is None else {"RAGSERVE_VLLM_STREAM_INTERVAL": str(args.stream_interval)}
    return {"RAGSERVE_GENERATE_MAX_TOKENS": str(args.max_tokens), "RAGSERVE_SERVER_ADMIN_KEY": ADMIN_KEY,
            "RAGSERVE_QUERY_MAX_IN_FLIGHT": "64", **interval, **extra}


class HttpSystems(Systems):
    """``bench_serving``'s systems plus ``ragserve serve`` over HTTP (native and OpenAI)."""

    async def start(self) -> None:
        import openai

        from ragserve.server.process import ServerProcess

        await super().start()  # the in-process engine (cache off) and the peer
        self.srv = ServerProcess(self.args.index, env=server_env(self.args, RAGSERVE_CACHE_ENABLED="false"),
                                 log=self.args.out / "server.log")
        t = time.perf_counter()
        await asyncio.to_thread(self.srv.start)
        self.start_s["ragserve serve"] = time.perf_counter() - t
        self.client = harness.http_client(self.srv.url, timeout=self.args.request_timeout)
        self.oa = openai.AsyncOpenAI(base_url=f"{self.srv.url}/v1", api_key="unused", max_retries=0,
                                     http_client=harness.http_client(timeout=self.args.request_timeout))
        self.available = [n for n in self.args.systems if n != "LlamaIndex" or n in self.available]
        self.log(f"ragserve serve up at {self.srv.url} in {self.start_s['ragserve serve']:.0f} s")

    async def stop(self) -> None:
        if getattr(self, "client", None) is not None:
            await self.client.aclose()
            await self.oa.close()
        if getattr(self, "srv", None) is not None:
            await asyncio.to_thread(self.srv.stop)
        await super().stop()

    async def run(self, name: str, qs: list[Any], c: int, drive: Any, timeout_s: float) -> Any:
        one = {"HTTP native": self._native_one, "HTTP OpenAI": self._openai_one, "in-process": self._inprocess_one,
               "HTTP native JSON": self._native_json_one, "in-process plain": self._inprocess_plain_one}.get(name)
        if one is None:
            return await super().run(name, qs, c, drive, timeout_s)
        return await drive(qs, c, one, timeout_s)

    async def reset_prefix_cache(self, name: str) -> None:
        if name.startswith("HTTP"):
            await harness.reset_prefix_cache(self.client, admin_key=ADMIN_KEY)
            return
        await super().reset_prefix_cache("ragserve" if name.startswith("in-process") else name)

    async def _native_one(self, i: int, q: Any) -> Record:
        t0 = time.perf_counter()
        ttft, _, done = await harness.stream_query(self.client, {"question": q.text})
        return _timed(Record.of_json(i, done), time.perf_counter() - t0, ttft)

    async def _native_json_one(self, i: int, q: Any) -> Record:
        t0 = time.perf_counter()
        d = await harness.post_ok(self.client, "/v1/query", {"question": q.text})
        return _timed(Record.of_json(i, d), time.perf_counter() - t0, streamed=False)

    async def _inprocess_plain_one(self, i: int, q: Any) -> Record:
        t0 = time.perf_counter()
        r = await self.rag.aquery(q.text)
        return _timed(Record.of_result(i, r), time.perf_counter() - t0, streamed=False)

    async def _openai_one(self, i: int, q: Any) -> Record:
        t0 = time.perf_counter()
        ttft, parts, extra, usage = None, [], None, None
        stream = await self.oa.chat.completions.create(
            model="ragserve", messages=[{"role": "user", "content": q.text}], stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                parts.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                extra = (chunk.model_extra or {}).get("ragserve")
            if chunk.usage is not None:
                usage = {"completion_tokens": chunk.usage.completion_tokens, "prompt_tokens": chunk.usage.prompt_tokens}
        if extra is None:
            raise RuntimeError("the stream ended without a finish chunk")
        answer = {"answer": "".join(parts).strip(), "usage": usage, "timings": extra["timings"]}
        return _timed(Record.of_json(i, answer), time.perf_counter() - t0, ttft)

    async def _inprocess_one(self, i: int, q: Any) -> Record:
        t0 = time.perf_counter()
        ttft, _, result = await harness.stream_inprocess(self.rag, q.text)
        return _timed(Record.of_result(i, result), time.perf_counter() - t0, ttft)

    def label_pid(self, pid: int) -> str:
        srv = getattr(self, "srv", None)
        if srv is not None and srv.proc is not None:
            if pid == srv.pid:
                return "ragserve serve (HTTP + pipeline)"
            if pid in harness.process_tree(srv.pid):
                return "ragserve serve: vLLM engine"
        return super().label_pid(pid)


def _timed(rec: Record, latency_s: float, ttft_s: float | None = None, *, streamed: bool = True) -> Record:
    """``rec`` with the client's view in its stages: ``ttft_ms`` for a streamed request (its
    latency if no token came) and ``outside_server_ms``, the latency less the server's ``total``."""
    if streamed:
        rec.stages["ttft_ms"] = (ttft_s if ttft_s is not None else latency_s) * 1e3
    rec.stages["outside_server_ms"] = latency_s * 1e3 - float(rec.stages.get("total", 0.0))
    return rec


# -- report ---------------------------------------------------------------------------------

def miss_table(runs: list[Run]) -> list[str]:
    lines = ["| system | C | requests | errors | req/s | p50 s | p95 s | TTFT p50 s | TTFT p95 s | "
             "outside the server, ms (mean / p50) | gold hit |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for run in runs:
        s = run.summary()
        ok = [r for r in run.records if not r.error]
        ttft = [r.stages["ttft_ms"] / 1e3 for r in ok if "ttft_ms" in r.stages]
        outside = [r.stages["outside_server_ms"] for r in ok if "outside_server_ms" in r.stages]
        n = len(ok)
        lines.append(
            f"| {run.system} | {run.concurrency} | {s['requests']} | {s['errors']} | {s['req_s']:.2f} | "
            f"{s['p50_s']:.2f} | {s['p95_s']:.2f} | "
            + (f"{pct(ttft, 50):.2f} | {pct(ttft, 95):.2f} | " if ttft else "— | — | ")
            + (f"{np.mean(outside):.2f} / {pct(outside, 50):.2f} | " if outside else "— | ")
            + f"{s['gold_hits']}/{n} |")
    return lines


def ratio_lines(runs: list[Run]) -> list[str]:
    by = {(r.system, r.concurrency): r.summary()["req_s"] for r in runs}
    lines = []
    for c in sorted({r.concurrency for r in runs}):
        for base_name, names in (("in-process", ("HTTP native", "HTTP OpenAI", "LlamaIndex")),
                                 ("in-process plain", ("HTTP native JSON",))):
            base = by.get((base_name, c))
            parts = [f"{name} {by[(name, c)] / base:.3f}×" for name in names if base and (name, c) in by]
            if parts:
                lines.append(f"- C={c}: requests/s relative to {base_name}: " + ", ".join(parts)
                             + (" (target at C=32: HTTP ≥ 0.95×)" if c == 32 else ""))
    return lines


def write_report(args: argparse.Namespace, machine: dict[str, Any], sys_: HttpSystems, runs: list[Run],
                 extra: dict[str, Any]) -> None:
    settings = {"index": args.index, "max_tokens": args.max_tokens, "stream_interval": sys_.cfg.vllm.stream_interval,
                "levels (C: questions)": args.per_level,
                "answer cache": "off for misses; on (L1 + embedded Redis) for the hit/overload server",
                "start-up s": {k: round(v, 1) for k, v in sys_.start_s.items()}, "peer": sys_.peer_note}
    lines = ["# HTTP serving benchmark (issue 11)", "", header_markdown(machine, settings), "",
             "## Misses: distinct questions, every request reaches vLLM", "", *miss_table(runs), "",
             *ratio_lines(runs), "",
             "TTFT: from sending the request to the first token at the client (streaming). *Outside the server*: "
             "the client's latency minus the server's own `total` for that request — the HTTP layer's cost "
             "(framing, the hop to the engine loop, loopback TCP, the client library).", ""]
    hits, o = extra.get("hits"), extra.get("overload")
    if hits:
        lines += ["## L1 hits over HTTP (native API, httpx keep-alive clients in this process)", "",
                  "| clients | requests | req/s | p50 ms | p99 ms | server's own total p50 ms | answered by |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {h['clients']} | {h['requests']} | {h['req_s']:.0f} | {h['p50_ms']:.2f} | {h['p99_ms']:.2f} | "
                  f"{h['server_p50_ms']:.3f} | {h['tiers']} |" for h in hits]
        alone = hits[0]
        lines += ["", f"- target: L1-hit p50 over HTTP ≤ 2 ms: {'met' if alone['p50_ms'] <= 2 else 'NOT met'} "
                  f"({alone['p50_ms']:.2f} ms with one client). With C clients in a closed loop, latency is "
                  "C / throughput (Little's law): at 64 clients the p50 says how many requests/s the server "
                  "and the client share of the 2 cores allow, not the cost of one request.", ""]
    if o:
        lines += ["## Overload: bursts of misses past the admission bounds (4 in flight + 4 queued)", "",
                  "| sent | 200 | 429 | other | 429 at the client p50 / max ms | 429 in the server p50 / p99 / max ms |",
                  "|---:|---:|---:|---|---|---|",
                  f"| {o['sent']} | {o['200']} | {o['429']} | {o['other']} | {o['p50_ms']:.1f} / {o['max_ms']:.1f} | "
                  f"{o.get('server_p50_ms', float('nan')):.1f} / {o.get('server_p99_ms', float('nan')):.1f} / "
                  f"{o.get('server_max_ms', float('nan')):.1f} |", "",
                  f"- target: 429 within 50 ms: {'met' if o.get('server_max_ms', 1e9) <= 50 else 'NOT met'} in the "
                  "server (its access log: from the request reaching the app to the response); the client's figure "
                  "adds the time this one Python client takes to send a burst of 64 and read the answers.", ""]
    lines += ["## CPU", "", *cpu_table([r.summary() for r in runs]), ""]
    harness.write_report("\n".join(lines), args.out / "report.md", args.out / "report.json",
                         {"runs": [r.summary() for r in runs], **extra})


async def main_async(args: argparse.Namespace) -> None:
    from ragserve import RAGConfig

    machine = harness.environment("fastapi", "uvicorn", "httpx", "openai", *PEER_PACKAGES)  # before the run
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = RAGConfig().replace(cache={"enabled": False}, generate={"max_tokens": args.max_tokens})
    if args.stream_interval is not None:
        cfg = cfg.replace(vllm={"stream_interval": args.stream_interval})
    await asyncio.to_thread(wl.ensure_index, args.index, args.xquad, cfg)
    questions = wl.load_questions(args.xquad)
    workload = wl.split(questions, args.per_level, max(args.warmup, 1), args.seed)
    sys_ = HttpSystems(args, cfg, workload, bs.log)
    runs: list[Run] = []
    extra: dict[str, Any] = {}
    try:
        await sys_.start()
        sampler = CpuSampler(sys_.label_pid)
        runs = await bs.run_levels(sys_, [n for n in args.systems if n in sys_.available], args, sampler)
    finally:
        await sys_.stop()
    env = server_env(args, RAGSERVE_QUERY_MAX_IN_FLIGHT="4", RAGSERVE_QUERY_MAX_QUEUED="4")
    extra = {} if args.skip_hits else await hits_and_overload(args, workload.spare, env)
    write_report(args, machine, sys_, runs, extra)


def main() -> None:
    asyncio.run(main_async(parse_args()))


if __name__ == "__main__":  # vLLM's engine spawns processes: the guard is required
    main()
