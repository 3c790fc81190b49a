"""``bottleneck_report.md``: the stage table, the profile and the memory of one run, and
advice whose every sentence comes from a rule over the measured numbers.

Each rule in ``RULES`` looks at the run's metrics and either says nothing or returns one
finding that quotes the numbers it used; thresholds are relative to the run itself (a
share of latency, a ratio between two stages), never absolute timings of one machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ragserve.profiling.breakdown import LABELS, OTHER, fmt_ms
from ragserve.profiling.env import header_markdown
from ragserve.profiling.memory import MACHINE

Metrics = dict[str, Any]


def _metrics(report: Any, env: dict[str, Any], config: Any) -> Metrics:
    g = report.groups
    miss = g.get("miss")
    ok = report.timed.ok()
    misses = [r for r in ok if r.tier == "miss"]
    m: Metrics = {"cores": env["cores"], "concurrency": report.timed.settings["concurrency"],
                  "top_k": config.query.top_k, "max_tokens": config.generate.max_tokens,
                  "errors": len(report.timed.records) - len(ok), "queries": len(report.timed.records),
                  "wall_s": report.timed.wall_s, "qps": len(ok) / report.timed.wall_s if report.timed.wall_s else 0.0,
                  "tiers": {k: v.n for k, v in g.items() if k != "hit"}}
    if miss:
        rows = {r.stage if r.parent is None else f"{r.parent}:{r.stage}": r for r in miss.rows}
        m["miss"] = {k: {"mean_ms": r.mean_ms, "share": r.share} for k, r in rows.items()}
        m["miss_total"] = miss.total
        top = [r for r in miss.top_level() if r.stage != OTHER]
        slow = max(top, key=lambda r: r.share)
        m["slowest"] = {"stage": slow.stage, "share": slow.share, "mean_ms": slow.mean_ms}
        m["miss_rps"] = len(misses) / report.timed.wall_s
        m["prompt_tokens"] = float(np.mean([r.prompt_tokens for r in misses])) if misses else 0.0
        m["completion_tokens"] = float(np.mean([r.completion_tokens for r in misses])) if misses else 0.0
    for name in ("l1", "l2"):
        if name in g:
            m[name] = {"total": g[name].total, "other_share": g[name].share(OTHER),
                       "lookup_share": g[name].share(f"cache_{name}")}
    prof = report.profiled
    if report.threads and prof:
        m["threads_busy"] = {k: v["busy_s"] / prof.wall_s for k, v in report.threads.items()}
        m["profiled_wall_s"] = prof.wall_s
    m["cpu"] = report.memory.get("cpu_timed_pass", {})
    m["peak"] = report.memory.get("peak", {})
    m["kv_cache_gib"] = config.vllm.kv_cache_gib
    return m


def _get(m: Metrics, key: str, field: str = "mean_ms") -> float:
    return float(m.get("miss", {}).get(key, {}).get(field, 0.0))


def rule_generation(m: Metrics) -> str | None:
    gen = _get(m, "generate")
    if not gen or _get(m, "generate", "share") < 0.5:
        return None
    q, f, d = (_get(m, f"generate:generate_{p}") for p in ("queue", "first_token", "decode"))
    share = 100 * _get(m, "generate", "share")
    if q / gen >= 0.25:
        return (f"Generation is {share:.0f}% of a miss and {100 * q / gen:.0f}% of it ({q:,.0f} ms) is waiting in "
                f"vLLM's scheduler: at {m['concurrency']} in flight the engine is saturated "
                f"({m['miss_rps']:.2f} misses/s). More concurrency adds queueing, not throughput; "
                f"more engine capacity (cores, GPU) or fewer generated tokens do.")
    if f >= d:
        return (f"Generation is {share:.0f}% of a miss, and prefill dominates it: first token {f:,.0f} ms vs decode "
                f"{d:,.0f} ms, for prompts of {m['prompt_tokens']:.0f} tokens on average (top_k {m['top_k']}). "
                f"Shorter prompts (smaller top_k or chunks) or prompts whose prefix repeats across questions "
                f"(vLLM's prefix cache) cut it most.")
    per_tok = d / max(m["completion_tokens"] - 1, 1)
    return (f"Generation is {share:.0f}% of a miss and decoding dominates it: {d:,.0f} ms for "
            f"{m['completion_tokens']:.1f} tokens on average ({per_tok:.0f} ms/token with {m['concurrency']} in "
            f"flight) against {f:,.0f} ms of prefill. max_tokens ({m['max_tokens']}) bounds it; answers that "
            f"stop earlier, or a faster engine, are where the time is.")


def rule_generation_rest(m: Metrics) -> str | None:
    gen, rest = _get(m, "generate"), _get(m, "generate:rest")
    if not gen or rest / gen < 0.2:
        return None
    return (f"{100 * rest / gen:.0f}% of generation ({rest:,.0f} ms per miss) lies outside vLLM's scheduler "
            f"timestamps, where its queue metric cannot see it: input processing and detokenisation in this "
            f"process, IPC, and a new request waiting for the engine core to finish its current step. vLLM's "
            f"frontend-side first_token_latency minus the engine's queue + prefill would split it per request.")


def rule_embed_queue(m: Metrics) -> str | None:
    wait, emb = _get(m, "embed_wait"), _get(m, "embed")
    if not emb or wait <= emb:
        return None
    return (f"Queries wait {wait:.1f} ms for the embedding worker, longer than embedding itself ({emb:.1f} ms): "
            f"with {m['concurrency']} clients the single worker is a queue. Embedding the waiting questions in "
            f"one model call (micro-batching) removes most of the wait.")


def _ours(cpu: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in cpu.items() if k != MACHINE}


def rule_contention(m: Metrics) -> str | None:
    cpu = m.get("cpu") or {}
    if MACHINE not in cpu:
        return None
    ours = _ours(cpu)
    others = cpu[MACHINE] - sum(ours.values())
    if others < 0.25 * 100 * m["cores"]:
        return None
    parts = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(ours.items(), key=lambda kv: -kv[1]) if v >= 1)
    return (f"Other jobs on this machine used {others:.0f}% of its {100 * m['cores']}% CPU during the timed pass "
            f"(this run: {parts}; 100% = one core). The latencies above are inflated by that contention: "
            f"compare shares between stages, not seconds between runs.")


def rule_cpu(m: Metrics) -> str | None:
    cpu = _ours(m.get("cpu") or {})
    used = sum(cpu.values())
    if not cpu or used < 0.8 * 100 * m["cores"]:
        return None
    parts = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
    return (f"The CPU was saturated during the timed pass: {used:.0f}% of {100 * m['cores']}% ({parts}). "
            f"Embedding in this process and vLLM's engine share {m['cores']} cores: pin thread counts "
            f"(embed.threads, VLLM_CPU_OMP_THREADS_BIND) and measure before adding concurrency.")


def rule_other(m: Metrics) -> str | None:
    share = _get(m, OTHER, "share")
    busy = (m.get("threads_busy") or {}).get("engine-loop", 0.0)
    if share < 0.05 and busy < 0.5:
        return None
    text = f"{100 * share:.1f}% of a miss ({_get(m, OTHER):.1f} ms) is outside every stage (hops between threads, pipeline code)."
    if busy:
        text += (f" The engine loop thread was busy {100 * busy:.0f}% of the profiled pass; every hop onto it "
                 f"waits behind that work (vLLM's output processing runs there).")
    return text


def rule_cache(m: Metrics) -> str | None:
    hits = m["tiers"].get("l1", 0) + m["tiers"].get("l2", 0)
    if not hits or "miss_total" not in m:
        return None
    out = []
    for name in ("l1", "l2"):
        if name in m:
            t = m[name]["total"]
            out.append(f"{name.upper()} hits p50 {fmt_ms(t['p50_ms'])} "
                       f"({m['miss_total']['p50_ms'] / max(t['p50_ms'], 1e-9):,.0f}× faster than a miss)")
    l1 = m.get("l1")
    tail = ""
    if l1 and l1["other_share"] > 0.5:
        tail = (f" Of an L1 hit only {100 * l1['lookup_share']:.0f}% is the lookup; the rest is validation, "
                f"normalisation, the SHA-256 key and building the result — microseconds, the floor of a hit.")
    return (f"{hits} of {m['queries']} queries were cache hits: " + "; ".join(out) + "." + tail)


def rule_memory(m: Metrics) -> str | None:
    peak = m.get("peak") or {}
    if not peak:
        return None
    child = sum(peak.get("children_then", {}).values())
    own = peak.get("own_mib_then", 0.0)
    who = "vLLM's engine process" if child > own else "this process"
    return (f"Peak memory {peak['total_mib']:,.0f} MiB (RSS, this process and children): {who} holds most of it "
            f"(this process {own:,.0f} MiB, children {child:,.0f} MiB; KV cache configured at "
            f"{m['kv_cache_gib']:g} GiB).")


RULES: list[Callable[[Metrics], str | None]] = [rule_contention, rule_generation, rule_generation_rest,
                                                rule_embed_queue, rule_cpu, rule_other, rule_cache, rule_memory]


def _profile_section(report: Any, slowest: str | None) -> str:
    if not report.stages:
        return "No profiled pass was run.\n"
    busy = sum(g.own_s for s, g in report.stages.items() if s != "idle") or 1e-9
    out = ["| thread | busy s | idle s | busy share of the pass |", "|---|--:|--:|--:|"]
    wall = report.profiled.wall_s if report.profiled else 1.0
    for name, t in report.threads.items():
        out.append(f"| {name} | {t['busy_s']:.2f} | {t['idle_s']:.2f} | {100 * t['busy_s'] / wall:.0f}% |")
    out.append("\n| stage (cProfile own time) | seconds | share of busy time |\n|---|--:|--:|")
    for stage, g in report.stages.items():
        if stage != "idle":
            out.append(f"| {stage} | {g.own_s:.2f} | {100 * g.own_s / busy:.1f}% |")
    real = [s for s in report.stages if s not in ("idle", "pipeline", "event loop", "client", "other")]
    show = [s for s in dict.fromkeys([slowest, *real[:1]]) if s in report.stages]
    for stage in show:
        note = (" (this process's side only: the model runs in vLLM's engine process)" if stage == "generate" else "")
        out.append(f"\nTop functions in **{stage}**{note}, by own time:\n")
        out.append("| own s | cumulative s | function |\n|--:|--:|---|")
        for fname, own, cum in report.stages[stage].functions[:8]:
            out.append(f"| {own:.3f} | {cum:.3f} | `{fname}` |")
    return "\n".join(out) + "\n"


def _memory_section(memory: dict[str, Any]) -> str:
    h = memory.get("holders", {})
    out = [f"- Peak: {memory.get('peak')}"]
    for key in ("embedder_weights_mib", "generator_files_mib", "index_files_mib", "l1_cache_mib",
                "kv_cache_gib_configured"):
        if key in h:
            out.append(f"- {key}: {h[key]}")
    out.append("\n| process (after the timed pass) | RSS MiB | USS MiB | PSS MiB |\n|---|--:|--:|--:|")
    for name, p in h.get("processes", {}).items():
        out.append(f"| {name} | {p['rss_mib']} | {p['uss_mib']} | {p['pss_mib']} |")
    for phase, lines in memory.get("top_lines", {}).items():
        out.append(f"\nLargest increments, {phase} (memory_profiler, this process only):\n")
        out.append("| increment MiB | RSS after MiB | line |\n|--:|--:|---|")
        for x in lines[:5]:
            out.append(f"| {x['increment_mib']} | {x['mem_mib']} | `{x['where']}` `{x['source'][:70]}` |")
    return "\n".join(out) + "\n"


def write_report(report: Any, env: dict[str, Any], *, settings: dict[str, Any], config: Any, index: Path) -> Metrics:
    """Write ``bottleneck_report.md`` and ``summary.json`` into the report folder."""
    from ragserve.profiling.breakdown import markdown

    m = _metrics(report, env, config)
    shown = {"index": str(index), **settings, "top_k": config.query.top_k, "max_tokens": config.generate.max_tokens,
             "generation model": report.models.get("generation", config.generate.model),
             "embedding model": report.models.get("embedding", config.embed.model),
             "kv_cache_gib": config.vllm.kv_cache_gib, "uniproc_executor": config.vllm.uniproc_executor,
             "embed threads": config.embed.threads or "torch default", "L2": config.cache.redis_url or "off"}
    slow = m.get("slowest")
    findings = []
    if slow:
        findings.append(f"Slowest stage on a miss: **{slow['stage']}**, {100 * slow['share']:.1f}% of end-to-end "
                        f"latency (mean {fmt_ms(slow['mean_ms'])} of {fmt_ms(m['miss_total']['mean_ms'])}).")
    findings.append(f"{m['queries']} queries in {m['wall_s']:.1f} s ({m['qps']:.2f}/s) with {m['concurrency']} "
                    f"clients; answered by {m['tiers']}; errors {m['errors']}.")
    phases = ", ".join(f"{name} {b - a:.1f} s" for name, a, b in report.memory.get("phases", []))
    findings[-1] += f" Phases: {phases}." if phases else ""
    findings += [f for f in (rule(m) for rule in RULES) if f]
    text = [f"# Bottleneck report: {index.name}\n", header_markdown(env, shown),
            "## Findings\n", *[f"{i}. {f}" for i, f in enumerate(findings, 1)],
            "\n## Where a query's time goes (timed pass, no profiler attached)\n",
            "Shares are of end-to-end latency, from each query's `Timings`. **vLLM runs its engine in a "
            "separate process**: generation's split into queue / first token / decode comes from vLLM's own "
            "per-request metrics (`RequestStateStats`), not from this process's cProfile.\n",
            markdown(report.groups), "![stage breakdown](stage_breakdown.png)\n",
            "## Inside the stages (cProfile of the profiled pass, all threads of this process)\n",
            "Files: `profile.prof` (merged; `snakeviz profile.prof` or `pstats`), one `.prof` per thread, "
            "`profile_top.txt`, `profile_by_stage.txt`. cProfile slows Python code, so these seconds are "
            "larger than in the timed pass; compare shares, not times.\n", _profile_section(report, slow and slow["stage"]),
            "## Memory\n", "![memory timeline](memory_timeline.png)\n", _memory_section(report.memory),
            "Line-by-line: `memory_build.txt`, `memory_load.txt`; samples: `memory_timeline.json`.\n",
            "## Labels\n", "; ".join(f"`{k}` = {v}" for k, v in LABELS.items()) + ".\n"]
    (report.folder / "bottleneck_report.md").write_text("\n".join(text), "utf-8")
    m["findings"] = findings
    (report.folder / "summary.json").write_bytes(orjson.dumps(m, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str))
    return m
