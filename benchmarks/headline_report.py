"""What ``bench_headline.py`` reports for each system's run of a question stream: throughput,
latency, where answers came from, how many generations the engine ran, CPU per request, and
whether cached answers can be trusted (answer fidelity).

Fidelity, per system with an answer cache:

- every answer served from a cache (or by joining a running generation) is byte-identical
  to the generation that stored it: the first generation of that question that completed
  in this run, or the stored answer the run started with (yesterday's, in day mode); for a
  semantic hit, of the cached question it matched;
- no question is generated again once an answer to it has completed (a request sent after
  that answer came back and still generated counts as a regeneration);
- generations counted at the engine (vLLM's own finished-request counter) against the
  stream's distinct questions: a cache with single-flight runs each exactly once.

vLLM on this CPU is not batch-invariant (the same greedy prompt can decode differently in
another batch), so a cached answer is compared with the generation that stored it, never
with a fresh run. Quality is compared instead: contains-gold of the answers a cache served
against the cache-off system's answers to the same requests.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import numpy as np
from harness import fmt, pct

CACHED_TIERS = ("l1", "l2", "semantic", "cache", "shared")
"""Tiers whose answer was not generated for this request: ragserve's L1/L2 and semantic
tier, a peer's LLM cache, and a single-flight join of an identical request's generation."""


@dataclass
class Req:
    """One request of a run, as the client saw it."""

    i: int
    qid: str
    key: str
    """The question as the cache keys it (``ragserve.cache.normalize_question``)."""
    sent_s: float
    done_s: float = 0.0
    tier: str = ""
    """``miss`` (generated for this request), ``l1``, ``l2``, ``cache`` (a peer's LLM cache),
    ``shared`` (joined an identical running generation), ``semantic`` (the answer of a
    cached question that means the same), ``error``."""
    answer: str = ""
    error: str | None = None
    match: str | None = None
    """A ``semantic`` hit: the cached question whose answer was served, as the cache keys it
    (its generation is the reference of the fidelity check, not this request's key)."""

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s


def fidelity(reqs: list[Req], stored: dict[str, str] | None = None) -> dict[str, Any]:
    """The cached-answer checks of the module docstring. ``stored``: key → answer already in
    the cache when the run started (yesterday's), the reference for those keys.

    A cache without single-flight may generate one question several times at once and
    store whichever write lands last: a served answer counts as identical when it equals
    one of the generations of its question that completed before it was sent.
    ``inconsistent_questions``: questions whose clients were served more than one answer."""
    generated: dict[str, list[tuple[float, str]]] = {k: [(float("-inf"), a)] for k, a in (stored or {}).items()}
    for r in sorted((r for r in reqs if r.tier == "miss"), key=lambda r: r.done_s):
        generated.setdefault(r.key, []).append((r.done_s, r.answer))
    served = [r for r in reqs if r.tier in CACHED_TIERS]
    compared = [r for r in served if _stored_as(r) in generated]
    identical = sum(_served_as_stored(r, generated[_stored_as(r)]) for r in compared)
    regenerated = [r for r in reqs if r.tier == "miss" and r.key in generated and r.sent_s > generated[r.key][0][0]]
    answers: dict[str, set[str]] = {}
    for r in reqs:
        if r.error is None:
            answers.setdefault(r.key, set()).add(r.answer)
    return {"served_from_cache": len(served), "compared": len(compared), "identical": identical,
            "identical_share": identical / len(compared) if compared else None,
            "no_reference": len(served) - len(compared),
            "regenerated_after_answer": len(regenerated),
            "regenerated_questions": len({r.key for r in regenerated}),
            "inconsistent_questions": sum(len(a) > 1 for a in answers.values())}


def _stored_as(r: Req) -> str:
    """The key whose generation a served answer must equal: a semantic hit's match, else its own."""
    return r.match if r.match is not None else r.key


def _served_as_stored(r: Req, generations: list[tuple[float, str]]) -> bool:
    """``r``'s answer is one of ``generations`` (done at, answer; the first is the reference)
    that completed before it was sent."""
    return any(r.answer == a for t, a in generations if t <= max(r.sent_s, generations[0][0]))


def summarize(name: str, reqs: list[Req], wall_s: float, generations: float | None,
              cpu_s: float | None, stored: dict[str, str] | None = None, *, cache: bool = True) -> dict[str, Any]:
    """One row of the report: everything but the quality comparison (``quality``). ``cache``:
    the system has an answer cache (without one, "cached = stored" does not apply: a
    single-flight join may join a later generation of its question, not the first)."""
    ok = [r for r in reqs if r.error is None]
    lat = np.array([r.latency_s for r in ok]) * 1e3
    tiers = Counter(r.tier for r in reqs)
    distinct = len({r.key for r in reqs})
    return {
        "system": name, "cache": cache, "requests": len(reqs), "errors": len(reqs) - len(ok),
        "error_examples": sorted({r.error for r in reqs if r.error})[:3],
        "wall_s": wall_s, "requests_per_s": len(ok) / wall_s if wall_s else float("nan"),
        "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99), "mean_ms": float(lat.mean()) if len(lat) else float("nan"),
        "tiers": {t: tiers.get(t, 0) for t in ("miss", *CACHED_TIERS, "error") if tiers.get(t)},
        "hit_rate": sum(tiers.get(t, 0) for t in CACHED_TIERS) / len(reqs) if reqs else float("nan"),
        "distinct_questions": distinct,
        "generations": generations,
        "generations_per_distinct": generations / distinct if generations is not None and distinct else None,
        "generations_per_s": generations / wall_s if generations is not None and wall_s else None,
        # time-averaged requests waiting on a generation of their own: the batch the engine saw
        "generating_in_flight": sum(r.latency_s for r in reqs if r.tier == "miss") / wall_s if wall_s else None,
        "miss_latency_s": float(np.mean([r.latency_s for r in reqs if r.tier == "miss"] or [float("nan")])),
        "cpu_s_per_request": cpu_s / len(reqs) if cpu_s is not None and reqs else None,
        "fidelity": fidelity(reqs, stored),
        "latencies_ms": [round(float(x), 3) for x in lat],
    }


def quality(cached: list[Req], fresh: list[Req], golds: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Contains-gold of the answers a cache served (``cached``' cache-tier requests) and of
    ``fresh`` (a cache-off run of the same stream) on the same request positions."""
    from ragserve.eval.scoring import contains_answer

    fresh_by_i = {r.i: r for r in fresh if r.error is None}
    pairs = [(r, fresh_by_i[r.i]) for r in cached if r.tier in CACHED_TIERS and r.i in fresh_by_i]
    if not pairs:
        return {"pairs": 0}
    c = [contains_answer(a.answer, golds[a.qid]) for a, _ in pairs]
    f = [contains_answer(b.answer, golds[b.qid]) for _, b in pairs]
    return {"pairs": len(pairs), "cached_contains_gold": float(np.mean(c)), "fresh_contains_gold": float(np.mean(f)),
            # the spread of a proportion over n pairs: what "within noise" means here
            "stderr": float(np.sqrt(max(np.mean(f) * (1 - np.mean(f)), 1e-9) / len(pairs)))}


def paraphrase_fields(reqs: list[Req], p: float, name: str) -> dict[str, Any]:
    """What a run of a paraphrased stream adds to its row: ``p``, the system's ``name`` (its
    row's label also says p), the distinct meanings (the stream's questions, by id, however
    they were worded) and the stream's ceiling for repeated meanings, 1 − meanings ÷
    requests (``ragserve.profiling.workload.repeat_ceiling``)."""
    from ragserve.profiling.workload import repeat_ceiling

    meanings = [r.qid for r in reqs]
    return {"paraphrase": p, "name": name, "meanings": len(set(meanings)),
            "ceiling": repeat_ceiling(meanings)}


PARAPHRASE_TIERS = ("l1", "l2", "semantic", "shared")


def paraphrase_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per (p, system), the rows of ``paraphrase_fields``: hits by tier as shares of the
    requests, the hits as a share of the stream's ceiling, throughput, latency and the
    generations the engine ran."""
    out = ["| p | system | requests | meanings | ceiling | hit rate | " + " | ".join(PARAPHRASE_TIERS)
           + " | hits ÷ ceiling | req/s | p50 ms | p95 ms | generations at vLLM | errors |",
           "|---:|---|---:|---:|---:|---:|" + "---:|" * (len(PARAPHRASE_TIERS) + 6)]
    for r in rows:
        if "paraphrase" not in r:
            continue
        n = r["requests"]
        shares = " | ".join(fmt(r["tiers"].get(t, 0) / n if n else None, ".1%") for t in PARAPHRASE_TIERS)
        of_ceiling = r["hit_rate"] / r["ceiling"] if r["ceiling"] else None
        out.append(f"| {r['paraphrase']:g} | {r['name']} | {n} | {r['meanings']} "
                   f"| {fmt(r['ceiling'], '.1%')} | {fmt(r['hit_rate'], '.1%')} | {shares} "
                   f"| {fmt(of_ceiling, '.1%')} | {fmt(r['requests_per_s'], '.2f')} "
                   f"| {fmt(r['p50_ms'], '.1f')} | {fmt(r['p95_ms'], '.0f')} "
                   f"| {fmt(r['generations'], '.0f')} | {r['errors']} |")
    return out


def paraphrase_lines(rows: list[dict[str, Any]], exact: str, semantic: str) -> list[str]:
    """Per p, the semantic tier against exact tiers only (systems ``semantic`` and ``exact``):
    the gain in hits, the room the stream leaves it (ceiling − exact-only: no tier that
    answers meanings can win more), and the issue's targets (≥ +15 points and ≥ 0.9 × the
    ceiling at p = 0.3; checked at every p)."""
    by = {(r["paraphrase"], r["name"]): r for r in rows if "paraphrase" in r}
    lines = []
    for p in sorted({p for p, _ in by}):
        on, off = by.get((p, semantic)), by.get((p, exact))
        if on is None or off is None:
            continue
        gain, room = on["hit_rate"] - off["hit_rate"], on["ceiling"] - off["hit_rate"]
        share = on["hit_rate"] / on["ceiling"] if on["ceiling"] else float("nan")
        lines.append(f"- p={p:g}: {semantic} − {exact}: **{100 * gain:+.1f} points** of hits "
                     f"(target ≥ +15: {'met' if gain >= 0.15 else 'NOT met'}; the stream leaves "
                     f"{100 * room:.1f} points above exact-only); hits {share:.1%} of the ceiling "
                     f"(target ≥ 90%: {'met' if share >= 0.9 else 'NOT met'}); generations "
                     f"{fmt(on['generations'], '.0f')} vs {fmt(off['generations'], '.0f')}; req/s "
                     f"{fmt(on['requests_per_s'], '.2f')} vs {fmt(off['requests_per_s'], '.2f')}; p95 "
                     f"{fmt(on['p95_ms'], '.0f')} vs {fmt(off['p95_ms'], '.0f')} ms")
    return lines


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| system | req/s | p50 ms | p95 ms | p99 ms | hit rate (tiers) | distinct | generations at vLLM "
           "| regenerated | cached = stored | questions given ≠ answers | CPU-s/req | errors |",
           "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fid = r["fidelity"]
        tiers = ", ".join(f"{t} {n}" for t, n in r["tiers"].items())
        same = f"{fid['identical']}/{fid['compared']}" if fid["compared"] and r["cache"] else "—"
        out.append(f"| {r['system']} | {fmt(r['requests_per_s'], '.2f')} | {fmt(r['p50_ms'], '.1f')} "
                   f"| {fmt(r['p95_ms'], '.0f')} | {fmt(r['p99_ms'], '.0f')} | {fmt(r['hit_rate'], '.1%')} ({tiers}) "
                   f"| {r['distinct_questions']} | {fmt(r['generations'], '.0f')} | {fid['regenerated_after_answer']} "
                   f"| {same} | {fid['inconsistent_questions']} | {fmt(r['cpu_s_per_request'], '.3f')} | {r['errors']} |")
    return out


def miss_table(rows: list[dict[str, Any]]) -> list[str]:
    """Where the misses' time goes: the rate the engine finished generations at, and how many
    requests were waiting on a generation of their own on average (the batch vLLM saw)."""
    out = ["| system | generations/s (at vLLM) | requests generating, time-averaged | mean miss latency s |",
           "|---|---:|---:|---:|"]
    for r in rows:
        if r["generations"]:
            out.append(f"| {r['system']} | {r['generations_per_s']:.2f} | {r['generating_in_flight']:.1f} "
                       f"| {r['miss_latency_s']:.1f} |")
    return out


def cpu_table(rows: list[dict[str, Any]]) -> list[str]:
    """Where the CPU went, per system: seconds per process over the run, and the share of
    the machine's cores they kept busy."""
    out = []
    for r in rows:
        by = r.get("cpu_s_by_process")
        if by:
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))
            busy = sum(by.values()) / r["wall_s"] if r["wall_s"] else float("nan")
            out.append(f"- CPU, {r['system']}: {parts}; {busy:.2f} cores busy on average")
    return out


def ratio_lines(rows: list[dict[str, Any]], names: dict[str, str]) -> list[str]:
    """The issue's targets, from this run's rows. ``names``: role (ours, recipe, peer) → system."""
    by = {r["system"]: r for r in rows}
    ours = by.get(names["ours"])
    if ours is None:
        return []
    lines = []
    for role, target, also_p95 in (("recipe", 1.5, True), ("peer", 3.0, False)):
        other = by.get(names[role])
        if other is None or not other["requests_per_s"]:
            lines.append(f"- {names[role]}: not measured in this run")
            continue
        ratio = ours["requests_per_s"] / other["requests_per_s"]
        line = f"- {names['ours']} / {names[role]} requests/s: **{ratio:.2f}×** (target ≥ {target}×: " \
               f"{'met' if ratio >= target else 'NOT met'})"
        if also_p95:
            lower = ours["p95_ms"] < other["p95_ms"]
            line += f"; p95 {ours['p95_ms']:.0f} vs {other['p95_ms']:.0f} ms ({'lower' if lower else 'NOT lower'})"
        lines.append(line)
    return lines


def cdf_png(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        lat = np.sort(np.array(r["latencies_ms"]) / 1e3)
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"{r['system']} ({r['requests_per_s']:.2f} req/s)")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("latency as the client sees it (s, log above 10 ms)")
    ax.set_ylabel("share of requests")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, header: list[str], rows: list[dict[str, Any]], extra_lines: list[str],
          data: dict[str, Any]) -> None:
    """``report.md`` (tables), ``report.json`` (everything, requests included) and
    ``latency_cdf.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cdf_png(rows, out / "latency_cdf.png", data.get("title", "latency CDF per system"))
    md = [*header, "", *table(rows), "", *miss_table(rows), "", *cpu_table(rows), "", *extra_lines, "",
          "Latency CDFs: `latency_cdf.png`."]
    slim = [{k: v for k, v in r.items() if k != "latencies_ms"} for r in rows]
    harness.write_report("\n".join(md), out / "report.md", out / "report.json", {**data, "rows": slim}, echo=False)
