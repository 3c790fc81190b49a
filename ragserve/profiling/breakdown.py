"""Each stage's share of end-to-end latency, per cache outcome, from per-query ``Timings``.

Shares are aggregate: a stage's milliseconds summed over the group's queries, divided by
their summed totals. The disjoint stages (read from ``Timings``, see
``ragserve.observe.timing.stage_layout``) plus an explicit ``other`` (total minus their sum: the
pipeline's own overhead and hops between threads) make 100% by construction, so what
matters is how small ``other`` is; ``coverage`` (stages / total, per query) shows it.
Parts of a stage (generation's queue / first token / decode, from vLLM's own metrics) are
sub-rows of it, with the rest of the stage as one more sub-row: for generation, the time
outside the engine core's scheduler timestamps (input processing and detokenisation in this
process, IPC, and a new request's wait for the engine core to finish its current step
before its scheduler sees it).

**Usage:**

    groups = breakdown(records)                 # records: workload QueryRecords
    print(markdown(groups)); stacked_bar(groups, "stage_breakdown.png")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragserve.observe.timing import TOTAL, stage_layout

OTHER = "other"
REST = "rest"
LABELS = {"generate_queue": "queue (vLLM scheduler)", "generate_first_token": "first token (prefill)",
          "generate_decode": "decode", REST: "rest (outside vLLM's scheduler timestamps)",
          OTHER: "other (pipeline overhead, thread hops)"}


@dataclass
class Row:
    stage: str
    mean_ms: float
    p50_ms: float
    share: float
    parent: str | None = None


@dataclass
class Group:
    name: str
    n: int
    total: dict[str, float]
    rows: list[Row] = field(default_factory=list)
    coverage: dict[str, float] = field(default_factory=dict)

    def share(self, stage: str) -> float:
        return next((r.share for r in self.rows if r.stage == stage and r.parent is None), 0.0)

    def top_level(self) -> list[Row]:
        return [r for r in self.rows if r.parent is None]


def _group(name: str, timings: list[dict[str, float]], stages: list[str], parts: dict[str, list[str]]) -> Group:
    total = np.array([t.get(TOTAL, 0.0) for t in timings])
    denom = float(total.sum()) or 1e-12
    rows: list[Row] = []
    covered = np.zeros(len(timings))

    def row(stage: str, values: np.ndarray, parent: str | None = None) -> Row:
        return Row(stage, float(values.mean()), float(np.percentile(values, 50)), float(values.sum()) / denom, parent)

    for stage in stages:
        v = np.array([t.get(stage, 0.0) for t in timings])
        if not v.any():
            continue  # a stage this group never ran (hits never embed)
        covered += v
        rows.append(row(stage, v))
        if stage in parts:
            rest = v.copy()
            for part in parts[stage]:
                pv = np.array([t.get(part, 0.0) for t in timings])
                rest -= pv
                rows.append(row(part, pv, stage))
            rows.append(row(REST, rest, stage))
    rows.append(row(OTHER, total - covered))
    cov = covered / np.where(total > 0, total, 1e-12)
    return Group(name, len(timings),
                 {"mean_ms": float(total.mean()), "p50_ms": float(np.percentile(total, 50)),
                  "p95_ms": float(np.percentile(total, 95)), "max_ms": float(total.max())},
                 rows, {"min": float(cov.min()), "p50": float(np.percentile(cov, 50)), "max": float(cov.max())})


def breakdown(records: Sequence[Any]) -> dict[str, Group]:
    """Groups ``miss``, ``l1``, ``l2`` (those present) and ``hit`` (l1 + l2)."""
    stages, parts = stage_layout()
    by: dict[str, list[dict[str, float]]] = {}
    for r in records:
        if getattr(r, "error", None) is None:
            by.setdefault(r.tier, []).append(r.timings)
    hits = by.get("l1", []) + by.get("l2", [])
    if by.get("l1") and by.get("l2"):
        by["hit"] = hits
    order = ["miss", "l1", "l2", "hit"]
    return {g: _group(g, by[g], stages, parts) for g in order if by.get(g)}


def per_query_coverage(timings: dict[str, float]) -> float:
    """Sum of the disjoint stages over the total, for one query."""
    stages, _ = stage_layout()
    total = timings.get(TOTAL, 0.0)
    return sum(timings.get(s, 0.0) for s in stages) / total if total > 0 else 0.0


def fmt_ms(ms: float) -> str:
    """Milliseconds for a reader: "25,533 ms", "2.6 ms", "13.0 µs"."""
    if abs(ms) >= 100:
        return f"{ms:,.0f} ms"
    if abs(ms) >= 1:
        return f"{ms:.1f} ms"
    return f"{ms * 1000:.1f} µs"


def markdown(groups: dict[str, Group]) -> str:
    """One table per group: mean / p50 ms and share of the group's end-to-end latency."""
    titles = {"miss": "Cache misses (full pipeline)", "l1": "L1 hits (in-process cache)",
              "l2": "L2 hits (Redis)", "hit": "All cache hits (L1 + L2)"}
    out = []
    for name, g in groups.items():
        t = g.total
        out.append(f"#### {titles.get(name, name)}: {g.n} queries, total mean {fmt_ms(t['mean_ms'])}, "
                   f"p50 {fmt_ms(t['p50_ms'])}, p95 {fmt_ms(t['p95_ms'])}\n")
        out.append("| stage | mean | p50 | share of latency |\n|---|--:|--:|--:|")
        for r in g.rows:
            label = LABELS.get(r.stage, r.stage)
            label = f"&nbsp;&nbsp;↳ {label}" if r.parent else label
            out.append(f"| {label} | {fmt_ms(r.mean_ms)} | {fmt_ms(r.p50_ms)} | {100 * r.share:.1f}% |")
        top = sum(r.share for r in g.top_level())
        out.append(f"| **total** | {fmt_ms(t['mean_ms'])} | {fmt_ms(t['p50_ms'])} | {100 * top:.1f}% |")
        c = g.coverage
        out.append(f"\nPer query, the stages cover {100 * c['min']:.1f}%–{100 * c['max']:.1f}% of the total "
                   f"(median {100 * c['p50']:.1f}%); the rest is the `other` row.\n")
    return "\n".join(out)


def stacked_bar(groups: dict[str, Group], path: str | os.PathLike[str]) -> None:
    """100% stacked bars, one per group; a split stage is drawn as its parts (hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segments: list[str] = []  # stable order and colours across bars
    for g in groups.values():
        for r in g.rows:
            key = f"{r.parent}:{r.stage}" if r.parent else r.stage
            has_parts = any(x.parent == r.stage for x in g.rows)
            if not has_parts and key not in segments:
                segments.append(key)
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(10, 1.6 + 1.1 * len(groups)))
    names = list(groups)
    for y, name in enumerate(names):
        g = groups[name]
        shares = {(f"{r.parent}:{r.stage}" if r.parent else r.stage): r.share for r in g.rows}
        left = 0.0
        for i, key in enumerate(segments):
            w = max(shares.get(key, 0.0), 0.0)
            if w <= 0:
                continue
            ax.barh(y, 100 * w, left=100 * left, color=cmap(i % 20), hatch="//" if ":" in key else None,
                    edgecolor="white", label=_legend(key))
            if w >= 0.04:
                ax.text(100 * (left + w / 2), y, f"{100 * w:.0f}%", ha="center", va="center", fontsize=8)
            left += w
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([f"{n}\n(n={groups[n].n}, mean {fmt_ms(groups[n].total['mean_ms'])})" for n in names])
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of end-to-end latency (%)")
    ax.set_title("where a query's time goes, by cache outcome")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.04 * len(groups)),
              ncol=4, fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _legend(key: str) -> str:
    parent, _, stage = key.rpartition(":")
    return f"{parent}: {LABELS.get(stage, stage)}" if parent else LABELS.get(stage, stage)
