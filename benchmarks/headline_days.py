"""Yesterday/today mode of ``bench_headline.py`` (``--days``): two independent streams from
the same Zipf law (``ragserve.profiling.workload.zipf_days``). Each system with an answer
cache answers today's stream twice:

- cold: nothing cached;
- warmed with yesterday's traffic. ragserve: ``ragserve warm`` over yesterday's question log,
  into the server's Redis and namespace, before today's run (its L1 starts cold: only L2
  holds yesterday's answers) — the stored answers (``--answers``) are the reference for the
  fidelity check. LangChain has no warm command: its users' caches fill from yesterday's
  traffic, so yesterday's stream runs through it first (not measured).

Reported: today's hit rate and requests/s, cold and warmed, and what the warming cost.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any


async def warm_ragserve(bench: Any, yesterday: list[Any], namespace: str) -> tuple[float, dict[str, str], str]:
    """``ragserve warm`` (the CLI, its own process and engine) over yesterday's log; returns
    its seconds, key → stored answer, and its summary line."""
    from ragserve.cache.keys import normalize_question

    a = bench.args
    folder = a.out / f"warm-{namespace}"
    folder.mkdir(parents=True, exist_ok=True)
    log, answers = folder / "yesterday.jsonl", folder / "answers.jsonl"
    log.write_text("".join(json.dumps({"id": str(i), "question": q.text}) + "\n" for i, q in enumerate(yesterday)))
    env = {**os.environ, "RAGSERVE_REDIS_URL": bench.redis.url, "RAGSERVE_CACHE_ENABLED": "true",
           "RAGSERVE_GENERATE_MAX_TOKENS": str(a.max_tokens),
           # an idle server's engine and a second one for the warm share the machine's memory
           "RAGSERVE_VLLM_KV_CACHE_GIB": os.environ.get("RAGSERVE_VLLM_KV_CACHE_GIB", "1")}
    cmd = [sys.executable, "-m", "ragserve.cli", "warm", str(a.index), str(log), "--namespace", namespace,
           "--concurrency", str(a.concurrency), "--answers", str(answers), "--json"]
    t = time.perf_counter()
    with open(folder / "warm.log", "wb") as out:
        rc = await asyncio.to_thread(subprocess.call, cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t
    text = (folder / "warm.log").read_text(errors="replace")
    if rc != 0:
        raise RuntimeError(f"ragserve warm exited {rc}:\n{text[-2000:]}")
    stored = {}
    for line in answers.read_text().splitlines():
        row = json.loads(line)
        stored[normalize_question(row["question"])] = row["answer"]
    summary = next((ln for ln in reversed(text.splitlines()) if "distinct questions:" in ln), "")
    return seconds, stored, summary.strip()


async def run_days(bench: Any, s: float, drive: Any) -> tuple[list[dict[str, Any]], list[str]]:
    from ragserve.profiling.workload import zipf_days

    a = bench.args
    yesterday, today = zipf_days(bench.dataset.questions, a.n, s=s, seed=a.seed)
    rows: list[dict[str, Any]] = []
    lines = [f"Yesterday/today (s={s:g}): yesterday {len({q.text for q in yesterday})} distinct questions, "
             f"today {len({q.text for q in today})}, {len({q.text for q in yesterday} & {q.text for q in today})} "
             "asked on both days."]
    for name in ("ragserve", "langchain"):
        if name not in bench.systems:
            continue
        cold, _ = await bench.run(name, today, f"{name}, today, cold")
        rows.append(cold)
        if name == "ragserve":
            namespace = f"headline-days-{uuid.uuid4().hex[:8]}"
            seconds, stored, summary = await warm_ragserve(bench, yesterday, namespace)
            how = f"`ragserve warm` of yesterday's log: {seconds:.0f} s ({summary})"
            warmed, _ = await bench.run(name, today, f"{name}, today, warmed", namespace=namespace, stored=stored)
        else:
            system = bench.systems[name]
            await system.prepare()
            _, wall = await drive(system, yesterday, a)
            how = f"yesterday's stream through it: {wall:.0f} s"
            warmed, _ = await bench.run(name, today, f"{name}, today, warmed", namespace="keep")
        rows.append(warmed)
        lines.append(f"- {name}: today's hit rate {cold['hit_rate']:.1%} cold → {warmed['hit_rate']:.1%} warmed; "
                     f"{cold['requests_per_s']:.2f} → {warmed['requests_per_s']:.2f} requests/s; p95 "
                     f"{cold['p95_ms']:.0f} → {warmed['p95_ms']:.0f} ms; warming: {how}")
    return rows, lines
