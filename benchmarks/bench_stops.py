"""Every way a supervisor stops ``ragserve serve --ray``, each repeated to catch a timing
window (issue 28): the exit status, and whether any process it started is left.

A case is (phase, signal, target, replicas):

- phase ``deploying``: the signal comes once the log says the deployment began; ``serving``:
  once the application answers a query over HTTP;
- signal ``TERM`` (``systemctl stop``), ``INT`` (Ctrl-C) or ``KILL`` (no graceful path at all);
- target ``process`` (the command's own pid: systemd's ``KillMode=mixed``) or ``group`` (its
  whole process group: ``kill -- -PGID``, ``KillMode=control-group``, a terminal's Ctrl-C);
- replicas 1 or 2 ingress replicas.

Each run starts a local cluster of its own (``ragserve/testing/processes.py``: the cluster,
Serve, the replicas, Redis and HTTP are real; generation is a fake OpenAI server), sends the
signal, and records the exit status and the seconds until no process carrying the run's
marker is left (bounded by ``--bound``; what is still there then is counted and killed).
Expected: exit 0 for TERM and INT; -9 for KILL; nothing left in every case.

    python benchmarks/bench_stops.py --repeat 10                      # the whole matrix: hours here
    python benchmarks/bench_stops.py --repeat 3 --phases serving --signals TERM,KILL

A benchmark, not a test: it asserts nothing. The single cases are tests in
``tests/test_ray_serve_process.py``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import bench_serving_workload as wl
import harness

from ragserve.testing.processes import kill_marked, marked, serve_ray

log = harness.logger("stops")
SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "KILL": signal.SIGKILL}
START_S = 600.0


def parse_args() -> argparse.Namespace:
    ap = harness.parser(__doc__)
    ap.add_argument("--index", type=Path, default=harness.XQUAD_INDEX)
    ap.add_argument("--repeat", type=int, default=10, help="runs per case")
    ap.add_argument("--phases", default="deploying,serving")
    ap.add_argument("--signals", default="TERM,INT,KILL")
    ap.add_argument("--targets", default="process,group")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--bound", type=float, default=60.0, help="seconds after the exit for every process to end")
    ap.add_argument("--out", type=Path, default=harness.REPO / "reports" / "bench_stops.md")
    args = ap.parse_args()
    args.phases, args.signals, args.targets = (a.split(",") for a in (args.phases, args.signals, args.targets))
    args.replicas = [int(r) for r in args.replicas.split(",")]
    if bad := set(args.signals) - set(SIGNALS):
        ap.error(f"unknown signals {sorted(bad)}; known: {', '.join(SIGNALS)}")
    return args


def one_run(args: argparse.Namespace, folder: Path, phase: str, sig: str, target: str, replicas: int) -> dict[str, Any]:
    import httpx

    with serve_ray(args.index, folder, replicas) as (proc, ready, log_path, marker):
        text = lambda: log_path.read_text(errors="replace")  # noqa: E731
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline and proc.poll() is None:
            if phase == "deploying" and "deploying" in text():
                break
            if phase == "serving" and ready.is_file():
                url = f"http://127.0.0.1:{int(ready.read_text())}"
                try:
                    if httpx.post(f"{url}/v1/query", json={"question": "Who won Super Bowl 50?"},
                                  timeout=30).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        else:
            return {"error": f"never reached {phase} (exit {proc.poll()}): {text()[-500:]}"}
        if phase == "deploying" and ready.exists():
            return {"error": "the application was up before the signal: not a deploying case"}
        started = len(marked(marker))
        t = time.monotonic()
        (os.killpg if target == "group" else os.kill)(proc.pid, SIGNALS[sig])
        try:
            code = proc.wait(timeout=START_S)
        except Exception:  # noqa: BLE001 - a hung stop is a result, not a crash of the benchmark
            code = None
        exit_s = time.monotonic() - t
        end = time.monotonic() + args.bound
        while marked(marker) and time.monotonic() < end:
            time.sleep(0.2)
        left = kill_marked(marker)
        return {"code": code, "exit_s": round(exit_s, 2), "empty_s": round(time.monotonic() - t, 2),
                "left": left, "processes": started}


def report(args: argparse.Namespace, env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = ["# `ragserve serve --ray` stopped every way", "", *harness.run_lines(env),
             f"- runs per case: {args.repeat}; bound for the processes to end after the exit: {args.bound:g} s", "",
             "| phase | signal | target | replicas | runs | exit statuses | expected | s to exit p50 / max | "
             "s until none left, max | processes left at the bound | failed to start |",
             "|---|---|---|---:|---:|---|---|---|---:|---:|---:|"]
    key = lambda r: (r["phase"], r["signal"], r["target"], r["replicas"])  # noqa: E731
    for case, group in itertools.groupby(sorted(rows, key=key), key=key):
        runs = list(group)
        ok = [r for r in runs if "error" not in r]
        codes = Counter(str(r["code"]) for r in ok)
        exits = [r["exit_s"] for r in ok]
        lines.append(
            f"| {' | '.join(map(str, case))} | {len(runs)} | "
            f"{', '.join(f'{c}×{n}' for c, n in sorted(codes.items())) or '-'} | "
            f"{'-9' if case[1] == 'KILL' else '0'} | "
            f"{harness.fmt(harness.pct(exits, 50), '.1f') if exits else '-'} / {max(exits, default=0):.1f} | "
            f"{max((r['empty_s'] for r in ok), default=0):.1f} | {sum(r['left'] for r in ok)} | "
            f"{len(runs) - len(ok)} |")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Runs that never reached their phase:", *(f"- {r['phase']} {r['signal']} {r['target']} "
                                                                  f"{r['replicas']}: {r['error'][:300]}" for r in errors)]
    return "\n".join(lines)


def main() -> None:
    from ragserve.config import RAGConfig

    args = parse_args()
    env = harness.environment(gpu=False)
    log(f"index: {wl.ensure_index(args.index, harness.XQUAD, RAGConfig.load())}")
    rows = []
    cases = list(itertools.product(args.phases, args.signals, args.targets, args.replicas))
    with tempfile.TemporaryDirectory(prefix="stops-") as tmp:
        for i in range(args.repeat):
            for phase, sig, target, replicas in cases:
                r = one_run(args, Path(tmp), phase, sig, target, replicas)
                r.update(phase=phase, signal=sig, target=target, replicas=replicas, run=i)
                rows.append(r)
                log(f"run {i + 1}/{args.repeat} {phase} {sig} {target} x{replicas}: "
                    f"{r.get('error') or (r['code'], r['exit_s'], r['left'])}")
    harness.write_report(report(args, env, rows), md=args.out, json_path=args.out.with_suffix(".json"), data=rows)


if __name__ == "__main__":
    main()
