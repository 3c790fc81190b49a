"""Measurements and their report for ``bench_serving.py``: per-request records, run
summaries, the markdown tables of results and CPU, and the PNG chart. (CPU accounting is
``harness.CpuSampler``.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bench_serving_workload import is_answer
from harness import fmt, pct

from ragserve.eval.scoring import contains_answer


@dataclass
class Record:
    """One request as the client saw it."""

    question: int
    latency_s: float = 0.0
    answer: str = ""
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    stages: dict[str, float] = field(default_factory=dict)
    chunk_ids: list[int] = field(default_factory=list)
    error: str = ""

    @classmethod
    def of_result(cls, i: int, r: Any, **extra: Any) -> Record:
        """From ragserve's ``QueryResult``: its answer, token counts and stage times."""
        return cls(i, answer=r.answer, completion_tokens=r.usage.completion_tokens,
                   prompt_tokens=r.usage.prompt_tokens, stages=r.timings.as_dict(), **extra)

    @classmethod
    def of_json(cls, i: int, d: dict[str, Any]) -> Record:
        """From the JSON of an answer over HTTP (``/v1/query``, a stream's ``done`` event)."""
        usage = d.get("usage") or {}
        return cls(i, answer=d["answer"], completion_tokens=usage.get("completion_tokens"),
                   prompt_tokens=usage.get("prompt_tokens"), stages=dict(d["timings"]))


@dataclass
class Run:
    system: str
    concurrency: int
    records: list[Record]
    wall_s: float
    golds: list[tuple[str, ...]]
    cpu: dict[str, Any] = field(default_factory=dict)
    server_stats: dict[str, float] = field(default_factory=dict)
    """For the OpenAI-server peer: deltas of vLLM's Prometheus counters over the run."""
    retrieval_overlap: float | None = None
    questions: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.records if not r.error]
        lat = [r.latency_s for r in ok]
        tokens = [r.completion_tokens for r in ok if r.completion_tokens is not None]
        out_tokens = sum(tokens) if len(tokens) == len(ok) else self.server_stats.get("generation_tokens")
        prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        prompt_mean = float(np.mean(prompts)) if prompts else self.server_stats.get("prompt_tokens_mean")
        stages: dict[str, float] = {}
        for name in sorted({k for r in ok for k in r.stages}):
            stages[name] = float(np.mean([r.stages.get(name, 0.0) for r in ok]))
        for name in ("generate_queue", "generate_first_token", "generate_decode"):
            if name in self.server_stats:
                stages[name] = self.server_stats[name]
        return {
            "system": self.system, "concurrency": self.concurrency, "requests": len(self.records),
            "errors": len(self.records) - len(ok), "wall_s": self.wall_s,
            "req_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "out_tok_s": (out_tokens / self.wall_s) if out_tokens is not None and self.wall_s else None,
            "out_tokens": out_tokens, "prompt_tokens_mean": prompt_mean,
            "p50_s": pct(lat, 50), "p95_s": pct(lat, 95),
            "stages_ms": stages,
            "answered": sum(is_answer(r.answer) for r in ok),
            "gold_hits": sum(contains_answer(r.answer, self.golds[i]) > 0 for i, r in enumerate(self.records)
                             if not r.error),
            "retrieval_overlap": self.retrieval_overlap,
            "cpu": self.cpu,
            "errors_seen": sorted({r.error for r in self.records if r.error})[:3],
        }


def merge_runs(runs: list[Run]) -> Run:
    """Rounds of one system at one level as one run: requests pooled, wall times and
    CPU-seconds added, vLLM's per-request means weighted by their request counts."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    cpu: dict[str, Any] = {}
    for r in runs:
        for k, v in r.cpu.items():
            if isinstance(v, dict):
                bucket = cpu.setdefault(k, {})
                for name, sec in v.items():
                    bucket[name] = bucket.get(name, 0.0) + sec
            else:
                cpu[k] = cpu.get(k, 0.0) + v
    stats: dict[str, float] = {}
    n = sum(r.server_stats.get("requests", 0.0) for r in runs)
    for key in {k for r in runs for k in r.server_stats}:
        if key in ("requests", "generation_tokens", "prompt_tokens"):
            stats[key] = sum(r.server_stats.get(key, 0.0) for r in runs)
        elif n:
            stats[key] = sum(r.server_stats.get(key, 0.0) * r.server_stats.get("requests", 0.0) for r in runs) / n
    overlaps = [r.retrieval_overlap for r in runs if r.retrieval_overlap is not None]
    return Run(first.system, first.concurrency, [x for r in runs for x in r.records], sum(r.wall_s for r in runs),
               [g for r in runs for g in r.golds], cpu, stats,
               float(np.mean(overlaps)) if overlaps else None, [q for r in runs for q in r.questions])


# -- markdown --------------------------------------------------------------------------------

STAGE_SHORT = {"generate_queue": "queue", "generate_first_token": "prefill", "generate_decode": "decode",
               "generate": "generate", "total": None, "cache_l1": None, "cache_l2": None}
# Pipeline order; stages this list does not know (a newer ragserve's) follow in name order.
STAGE_ORDER = ["admission", "embed_wait", "embed", "search", "docload", "prompt", "generate",
               "generate_queue", "generate_first_token", "generate_decode"]


def stage_text(stages: dict[str, float]) -> str:
    parts = []
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    for name, ms in sorted(stages.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])):
        short = STAGE_SHORT.get(name, name)
        if short is not None and (ms >= 0.05 or name.startswith("generate")):
            parts.append(f"{short} {ms:,.0f}" if ms >= 10 else f"{short} {ms:.1f}")
    return " · ".join(parts) or "—"


def results_table(summaries: list[dict[str, Any]]) -> list[str]:
    lines = ["| system | C | requests | errors | req/s | out tok/s | p50 s | p95 s | prompt tok | "
             "stage means (ms) | answered | gold hit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for s in summaries:
        ok = s["requests"] - s["errors"]
        hit = f"{s['gold_hits']}/{ok} ({s['gold_hits'] / ok:.0%})" if ok else "—"
        lines.append(
            f"| {s['system']} | {s['concurrency']} | {s['requests']} | {s['errors']} | {s['req_s']:.2f} | "
            f"{fmt(s['out_tok_s'], '.1f')} | {s['p50_s']:.2f} | {s['p95_s']:.2f} | "
            f"{fmt(s['prompt_tokens_mean'], '.0f')} | "
            f"{stage_text(s['stages_ms'])} | {s['answered']}/{ok} | {hit} |")
    return lines


def cpu_per_request(s: dict[str, Any]) -> float:
    """CPU-seconds of every process this benchmark started (engines, server, this one) per
    answered request: unlike wall time, it does not grow when others take the cores."""
    ok = s["requests"] - s["errors"]
    return s["cpu"]["ours_s"] / ok if s["cpu"] and ok else float("nan")


def cpu_table(summaries: list[dict[str, Any]]) -> list[str]:
    lines = ["| system | C | wall s | CPU-s per request, all ours | CPU-s by process (per request) | "
             "this process by thread | other load on the machine |", "|---|---:|---:|---:|---|---|---|"]
    for s in summaries:
        c = s["cpu"]
        if not c:
            continue
        n = max(s["requests"], 1)
        procs = "; ".join(f"{k} {v:.1f} ({v / n:.2f})"
                          for k, v in sorted(c["procs"].items(), key=lambda kv: -kv[1]))
        threads = "; ".join(f"{k} {v:.1f}" for k, v in sorted(c["threads"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {s['system']} | {s['concurrency']} | {c['wall_s']:.1f} | {cpu_per_request(s):.2f} | "
                     f"{procs} | {threads} | "
                     f"{c['others_s']:.1f} CPU-s ({c['others_s'] / c['wall_s']:.2f} cores) |")
    return lines


def chart(summaries: list[dict[str, Any]], path: Path, sequential: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    systems = list(dict.fromkeys(s["system"] for s in summaries))
    for name in systems:
        rows = sorted((s for s in summaries if s["system"] == name), key=lambda s: s["concurrency"])
        cs = [r["concurrency"] for r in rows]
        ax1.plot(cs, [r["req_s"] for r in rows], marker="o", label=name)
        ax2.plot(cs, [r["p95_s"] for r in rows], marker="o", label=name)
    if sequential:
        ax1.axhline(sequential["req_s"], color="grey", linestyle="--", label="sequential rag.query loop")
    for ax, title, unit in ((ax1, "throughput", "requests/s"), (ax2, "p95 latency", "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([s for s in sorted({s["concurrency"] for s in summaries})])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("requests in flight (concurrency)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
