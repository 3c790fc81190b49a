"""Hostile requests against a real ``ragserve serve`` process (issue 28): ``--requests``
(10,000) drawn by ``ragserve/testing/fuzz.py`` from ``--seed`` across ``/v1/query``,
``/v1/retrieve`` and ``/v1/chat/completions`` — malformed JSON, wrong types, huge, Unicode
and control-character strings, bad headers and framing — each on its own connection,
``--concurrency`` at a time, on 127.0.0.1 only.

The server is ``scripts/fake_serve.py`` (``serve_index``: the real HTTP stack, API keys on,
the embedded Redis, over stand-in models: no vLLM) with ``[server]`` defaults but
``body_timeout_s`` (``--body-timeout``: the requests whose Content-Length lies long wait
that long for a 408). Reported: answers by status, per endpoint and per category; every
answer that is not a 2xx or a typed 4xx, a 5xx, a late one (no whole answer within
``--timeout``), or an error body with a trace or a server path (``fuzz.problem``); label values in
``/metrics`` that ragserve's code did not name (``fuzz.label_problems``); ``/health``
every ``--health-every`` requests and at the end; the server's RSS; ERROR lines and
tracebacks in its log.

Run:

    python benchmarks/bench_fuzz.py --index indexes/pydoc
    python benchmarks/bench_fuzz.py --index indexes/pydoc --requests 2000 --seed 7

A benchmark, not a test: it exits 1 if any answer had a problem.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
from harness import pct

log = harness.logger("fuzz")
KEY = "bench-fuzz-key-0123456789abcdef"


def parse_args() -> argparse.Namespace:
    ap = harness.parser(__doc__, raw=False)
    ap.add_argument("--index", type=Path, default=harness.REPO / "indexes" / "pydoc")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=28)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for a whole answer")
    ap.add_argument("--body-timeout", type=float, default=2.0, help="server.body_timeout_s")
    ap.add_argument("--health-every", type=int, default=500)
    ap.add_argument("--out", type=Path, default=harness.REPO / "reports" / "bench_fuzz.md")
    return ap.parse_args()


async def fuzz_run(port: int, url: str, args: argparse.Namespace, proc_pid: int) -> dict[str, Any]:
    import psutil

    from ragserve.testing import fuzz

    reqs = list(fuzz.requests(args.seed, args.requests, KEY))
    server = psutil.Process(proc_pid)
    results, health, peak_rss = [], [], 0
    t0 = time.perf_counter()
    for start in range(0, len(reqs), args.health_every):
        batch = reqs[start:start + args.health_every]
        results += await fuzz.run(port, batch, concurrency=args.concurrency, timeout_s=args.timeout)
        probe = await fuzz.send(port, b"GET /health HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n", 30)
        health.append(probe.status)
        peak_rss = max(peak_rss, server.memory_info().rss)
        log(f"{len(results)}/{len(reqs)} sent; /health {probe.status}; rss {server.memory_info().rss / 2**20:.0f} MB")
    seconds = time.perf_counter() - t0
    metrics = await fuzz.send(port, b"GET /metrics HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n", 30)
    labels = fuzz.label_problems(metrics.body.decode(), fuzz.known_labels())
    return {"results": results, "health": health, "seconds": seconds, "peak_rss_mb": peak_rss / 2**20,
            "end_rss_mb": server.memory_info().rss / 2**20, "label_problems": labels,
            "metrics_status": metrics.status}


def tables(out: dict[str, Any]) -> list[str]:
    results = out["results"]
    statuses = sorted({a.status or 0 for _, a, _ in results})
    head = "| | requests | " + " | ".join(str(s) if s else "none" for s in statuses) + " | problems |"
    rows = [head, "|---" * (len(statuses) + 3) + "|"]

    def row(name: str, subset: list[Any]) -> str:
        count = collections.Counter(a.status or 0 for _, a, _ in subset)
        probs = sum(1 for _, _, p in subset if p)
        return f"| {name} | {len(subset)} | " + " | ".join(str(count.get(s, 0)) for s in statuses) + f" | {probs} |"

    rows.append(row("**all**", results))
    for endpoint in sorted({r.endpoint for r, _, _ in results}):
        rows.append(row(f"`{endpoint}`", [x for x in results if x[0].endpoint == endpoint]))
    for category in sorted({r.category for r, _, _ in results}):
        rows.append(row(category, [x for x in results if x[0].category == category]))
    return rows


def report(args: argparse.Namespace, env: dict[str, Any], out: dict[str, Any], server_log: str, exit_code: Any,
           stop_s: float) -> str:
    results = out["results"]
    problems = [(r, p) for r, _, p in results if p]
    seconds = [a.seconds for _, a, _ in results if a.status]
    errors = [line for line in server_log.splitlines() if re.search(r"\bERROR\b|Traceback", line)]
    fivexx = sum(1 for _, a, _ in results if (a.status or 0) >= 500)
    late = sum(1 for _, a, _ in results if a.error == "hang")
    lines = ["# Hostile requests against `ragserve serve` (fake_serve.py, API keys, embedded Redis)", "",
             *harness.run_lines(env),
             f"- {args.requests:,} requests, seed {args.seed}, {args.concurrency} at a time, each on a new connection "
             f"to 127.0.0.1; server.body_timeout_s = {args.body_timeout:g}", "",
             f"- sent in {out['seconds']:.1f} s ({len(results) / out['seconds']:.0f}/s); answer time p50 "
             f"{pct(seconds, 50) * 1e3:.1f} ms, p99 {pct(seconds, 99) * 1e3:.1f} ms, max {max(seconds) * 1e3:.0f} ms",
             f"- problems (not a 2xx or a typed 4xx, a trace or path in an error body, no whole answer within "
             f"{args.timeout:g} s): **{len(problems)}**; 5xx: **{fivexx}**; late: **{late}**",
             f"- /health after every {args.health_every} requests: "
             f"{dict(collections.Counter(out['health']))}; /metrics {out['metrics_status']}, label values not named "
             f"by ragserve's code: **{len(out['label_problems'])}**",
             f"- server RSS peak {out['peak_rss_mb']:.0f} MB, at the end {out['end_rss_mb']:.0f} MB; "
             f"ERROR or Traceback lines in its log: **{len(errors)}**; stopped by SIGTERM: exit {exit_code} "
             f"in {stop_s:.1f} s", "", "## Answers by status", "", *tables(out)]
    if problems:
        lines += ["", "## Problems (first 30)", ""]
        lines += [f"- `{r.endpoint}` {r.category}/{r.detail}: {p[:300]}" for r, p in problems[:30]]
    if out["label_problems"]:
        lines += ["", "## Label values from requests", "", *[f"- {x}" for x in out["label_problems"][:30]]]
    if errors:
        lines += ["", "## Server log: ERROR lines (first 20)", "", "```", *errors[:20], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    env = harness.environment(gpu=False)
    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp_:
        tmp = Path(tmp_)
        keys = tmp / "keys.json"
        keys.write_text(json.dumps({KEY: "fuzz-tenant"}))
        ready = tmp / "port"
        senv = {**os.environ, "RAGSERVE_HOME": str(tmp / "home"), "PYTHONPATH": str(harness.REPO),
                "RAGSERVE_SERVER_API_KEYS_FILE": str(keys), "RAGSERVE_SERVER_BODY_TIMEOUT_S": str(args.body_timeout)}
        argv = [sys.executable, str(harness.SCRIPTS / "fake_serve.py"), str(args.index), "--ready-file", str(ready),
                "--tokens", "16", "--step-ms", "2", "--grace", "5"]
        proc, url = harness.launch(argv, env=senv, log=tmp / "server.log", ready=ready, timeout_s=120,
                                   what="fake_serve")
        try:
            out = asyncio.run(fuzz_run(int(url.rsplit(":", 1)[1]), url, args, proc.pid))
        finally:
            code, secs = harness.stop(proc, 60)
            log(f"server stopped: exit {code} in {secs:.1f} s")
        server_log = (tmp / "server.log").read_text(errors="replace")
    text = report(args, env, out, server_log, code, secs)
    data = {"problems": [(r.endpoint, r.category, r.detail, p) for r, _, p in out["results"] if p],
            "statuses": dict(collections.Counter(a.status or 0 for _, a, _ in out["results"])),
            "label_problems": out["label_problems"], "health": out["health"], "seconds": out["seconds"]}
    harness.write_report(text, md=args.out, json_path=args.out.with_suffix(".json"), data=data)
    bad = data["problems"] or out["label_problems"] or any(h != 200 for h in out["health"])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
