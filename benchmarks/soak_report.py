"""What a soak measured (``Sample``, ``Result``) and its markdown report; ``failures`` says
why a run failed. The run is ``soak.py``'s."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from harness import pct
from soak_traffic import KINDS, Record, Settings

MB = 2**20


@dataclass(frozen=True)
class Sample:
    t_s: float
    rss_server: int
    rss_engine: int
    """Child processes other than Redis (the vLLM engine core)."""
    rss_redis: int
    fds: int
    children: int


@dataclass
class Result:
    settings: Settings
    url: str
    records: list[Record]
    samples: list[Sample]
    before: Sample | None
    """Idle, after the hot set was primed and before the run."""
    after: Sample | None
    """Idle, after the run (client closed, requests done)."""
    in_flight_after: int | None
    wall_s: float
    held: list[tuple[float, int]] = field(default_factory=list)
    """(t, requests the vLLM engine holds), from ``/metrics`` at every sample: never more
    than the generating workers, give or take a request being aborted."""
    held_after: int | None = None
    """Requests vLLM still holds after the run (abandoned ones must have been aborted)."""
    l1: list[tuple[float, int, int]] = field(default_factory=list)
    """(t, bytes, entries) of the server's L1 answer cache, from ``/v1/stats`` at every sample."""

    @property
    def errors_500(self) -> list[Record]:
        return [r for r in self.records if r.status == 500]

    @property
    def unexpected(self) -> list[Record]:
        return [r for r in self.records if not r.expected]

    def warm(self) -> Sample | None:
        """The sample at the end of the warm-up (the first one if the run is shorter)."""
        warm = [s for s in self.samples if s.t_s <= self.settings.warmup_s]
        return warm[-1] if warm else (self.samples[0] if self.samples else None)

    def last(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def rss_growth(self) -> tuple[int, int] | None:
        """(server, engine) RSS growth in bytes, end of warm-up → last sample of the run."""
        w, e = self.warm(), self.last()
        return None if w is None or e is None else (e.rss_server - w.rss_server, e.rss_engine - w.rss_engine)

    def l1_growth(self) -> tuple[int, int, int] | None:
        """(bytes at the end of the warm-up, bytes at the end, entries at the end) of L1."""
        w = [x for x in self.l1 if x[0] <= self.settings.warmup_s] or self.l1[:1]
        return (w[-1][1], self.l1[-1][1], self.l1[-1][2]) if w else None

    def net_rss_growth(self) -> int | None:
        """Server RSS growth less the growth of what L1 holds (a bounded cache filling up)."""
        growth, l1 = self.rss_growth(), self.l1_growth()
        return None if growth is None else growth[0] - (l1[1] - l1[0] if l1 else 0)

    def rss_pace(self) -> tuple[float, float] | None:
        """Server RSS growth in MB per minute in the first and the second half of the time from
        the end of the warm-up to the end of the run."""
        w, e = self.warm(), self.last()
        if w is None or e is None or e.t_s - w.t_s < 4 * self.settings.sample_s:
            return None
        mid = min(self.samples, key=lambda x: abs(x.t_s - (w.t_s + e.t_s) / 2))

        def pace(a: Sample, b: Sample) -> float:
            return (b.rss_server - a.rss_server) / MB / ((b.t_s - a.t_s) / 60)

        return pace(w, mid), pace(mid, e)

    def fd_growth(self) -> int | None:
        """Open fds after the run minus before it, both idle."""
        return None if self.before is None or self.after is None else self.after.fds - self.before.fds


# -- the report ----------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{x * 1e3:.0f}" if x >= 0.01 else f"{x * 1e3:.1f}"


def _mb(x: int | None) -> str:
    return "n/a" if x is None else f"{x / MB:.0f}"


def report(res: Result) -> str:
    """The markdown report: one row per period, outcomes per kind, the summary."""
    s = res.settings
    kinds = [k for k in KINDS if any(r.kind == k for r in res.records)]
    periods = max(1, math.ceil(s.duration_s / s.period_s - 1e-9))  # what ends after the run: in the last row
    by_period: dict[int, list[Record]] = defaultdict(list)
    for r in res.records:
        by_period[min(periods - 1, int(r.end_s // s.period_s))].append(r)
    unit = "minute" if s.period_s == 60 else f"{s.period_s:g} s period"
    lines = [f"Per {unit}: requests and p50/p99 latency in ms by kind (for `cancel`: until the client "
             "left); RSS in MB at the period's last sample (server process; its children but Redis: the vLLM "
             "engine core; the embedded Redis)", "",
             f"| {unit} | requests | " + " | ".join(f"{k} n · p50/p99" for k in kinds)
             + " | unexpected | 500 | RSS server | RSS engine | RSS redis | fds | vLLM held (max) |",
             "|---" * (len(kinds) + 9) + "|"]
    for p in range(periods):
        rows = by_period.get(p, [])
        cells = []
        for k in kinds:
            lat = [r.latency_s for r in rows if r.kind == k]
            cells.append(f"{len(lat)} · {_ms(pct(lat, 50))}/{_ms(pct(lat, 99))}" if lat else "0")
        end = (p + 1) * s.period_s
        smp = [x for x in res.samples if x.t_s <= end + s.sample_s / 2]
        last = smp[-1] if smp else None
        mem = ([_mb(last.rss_server), _mb(last.rss_engine), _mb(last.rss_redis), str(last.fds)] if last
               else ["n/a"] * 4)
        held = [n for t, n in res.held if p * s.period_s <= t < end]
        lines.append(f"| {p + 1} | {len(rows)} | " + " | ".join(cells)
                     + f" | {sum(not r.expected for r in rows)} | {sum(r.status == 500 for r in rows)} | "
                     + " | ".join(mem) + f" | {max(held) if held else 'n/a'} |")
    lines += ["", "Outcomes of the whole run, by kind (unexpected ones marked ✗):", "",
              "| kind | requests | p50 ms | p99 ms | outcomes |", "|---|---|---|---|---|"]
    for k in kinds:
        rows = [r for r in res.records if r.kind == k]
        lat = [r.latency_s for r in rows]
        outcomes = Counter((r.outcome, r.expected) for r in rows)
        text = ", ".join(f"{o}{'' if ok else ' ✗'}: {n}" for (o, ok), n in outcomes.most_common())
        lines.append(f"| {k} | {len(rows)} | {_ms(pct(lat, 50))} | {_ms(pct(lat, 99))} | {text} |")
    lines += ["", *summary_lines(res)]
    problems = res.unexpected
    if problems:
        lines += ["", f"Unexpected responses ({len(problems)}; at most 20 shown, by the request id the server "
                  "logs):", ""]
        for r in problems[:20]:
            lines.append(f"- `{r.request_id}` {r.kind} / {r.variant}: {r.outcome}; {r.detail}")
    return "\n".join(lines)


def summary_lines(res: Result) -> list[str]:
    s = res.settings
    n = len(res.records)
    growth, warm, last = res.rss_growth(), res.warm(), res.last()
    out = [f"- **Requests**: {n} in {res.wall_s:.0f} s ({n / max(res.wall_s, 1e-9):.1f}/s) at concurrency "
           f"{s.concurrency}; **500s: {len(res.errors_500)}**; unexpected responses: {len(res.unexpected)}"]
    if growth is not None and warm is not None and last is not None:
        out.append(f"- **RSS growth** from {warm.t_s:.0f} s (end of the warm-up) to {last.t_s:.0f} s: server "
                   f"{growth[0] / MB:+.1f} MB ({warm.rss_server / MB:.0f} → {last.rss_server / MB:.0f}), engine "
                   f"{growth[1] / MB:+.1f} MB ({warm.rss_engine / MB:.0f} → {last.rss_engine / MB:.0f}), Redis "
                   f"{(last.rss_redis - warm.rss_redis) / MB:+.1f} MB; server peak "
                   f"{max(x.rss_server for x in res.samples) / MB:.0f} MB; {len(res.samples)} samples every "
                   f"{s.sample_s:g} s")
        l1, net = res.l1_growth(), res.net_rss_growth()
        if l1 is not None and net is not None:
            out.append(f"- **Net of the L1 answer cache** (bounded by `cache.l1_max_bytes`; encoded bytes): L1 "
                       f"{l1[0] / MB:.1f} → {l1[1] / MB:.1f} MB ({l1[2]} entries at the end); server RSS growth "
                       f"less the L1 growth: **{net / MB:+.1f} MB**")
        pace = res.rss_pace()
        if pace is not None:
            out.append(f"- **RSS growth pace** after the warm-up: {pace[0]:+.1f} MB/min in its first half, "
                       f"{pace[1]:+.1f} MB/min in its second (a cache filling up slows down; a leak keeps its pace)")
    else:
        out.append("- **RSS**: not sampled (no server process id)")
    if res.before is not None and res.after is not None:
        peak = max(x.fds for x in res.samples) if res.samples else res.after.fds
        out.append(f"- **Open fds** (server process) idle before → idle after the run: {res.before.fds} → "
                   f"{res.after.fds} ({res.fd_growth():+d}); peak under load {peak}; child processes "
                   f"{res.before.children} → {res.after.children}")
    slots = s.max_generating or max(1, s.concurrency // 2)
    peak = max((n for _, n in res.held), default=None)
    out.append(f"- **After the run**: {res.in_flight_after} requests in flight on the server, {res.held_after} "
               f"held by vLLM (abandoned ones aborted); vLLM held at most {peak} during the run, with at most "
               f"{slots} generating workers")
    return out


def failures(res: Result, max_rss_growth_mb: float | None = None) -> list[str]:
    """Why the run failed ([] if it did not)."""
    why = []
    if res.errors_500:
        why.append(f"{len(res.errors_500)} responses with status 500")
    if res.unexpected:
        why.append(f"{len(res.unexpected)} unexpected responses")
    if res.in_flight_after not in (0, None):
        why.append(f"{res.in_flight_after} requests still in flight after the run")
    if res.held_after not in (0, None):
        why.append(f"{res.held_after} requests still held by vLLM after the run")
    net = res.net_rss_growth()
    if max_rss_growth_mb is not None and net is not None and net / MB > max_rss_growth_mb:
        why.append(f"server RSS grew {net / MB:.1f} MB net of the L1 cache (limit {max_rss_growth_mb:g} MB)")
    return why
