"""cProfile in every thread the pipeline runs in, merged, and attributed to stages.

cProfile sees only the thread it is enabled in. A query crosses three: the caller's (the
L1 fast path, the client loop), the engine loop (cache, docload, prompt, vLLM's client
side) and the embed worker (embed, search). ``ThreadProfiler`` enables one profiler inside
each and merges them with ``pstats.Stats.add``. vLLM's engine core runs in a child
process: its model time is not in this profile (the report takes generation's split from
vLLM's per-request metrics instead).

``attribute`` maps every profiled function to pipeline stages through its callers, back to
a stage's entry point (``ROOTS``), weighting each caller by the time spent under it; a
function no root reaches falls back to a rule on its module (``MODULES``).

**Usage:**

    prof = ThreadProfiler(rag); prof.start(); ...run queries...; prof.stop()
    stats = prof.dump("profile.prof")   # merged; per thread as profile.THREAD.prof
    groups = attribute(stats)        # {stage: StageGroup(own_s, functions)}
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Func = tuple[str, int, str]

# (path fragment, function name) → stage: the functions where a stage's work begins.
ROOTS: list[tuple[str, str, str]] = [
    ("ragserve/retrieval/embed.py", "encode", "embed"),
    ("ragserve/retrieval/faiss_index.py", "search", "search"),
    ("ragserve/retrieval/docstore.py", "get_many", "docload"),
    ("ragserve/generators/prompt.py", "build", "prompt"),
    ("ragserve/generators/vllm.py", "generate", "generate"),
    ("ragserve/generators/vllm.py", "stream", "generate"),
    ("ragserve/generators/vllm.py", "_run", "generate"),
    ("ragserve/generators/openai.py", "", "generate"),
    ("ragserve/cache/l1.py", "get", "cache_l1"),
    ("ragserve/cache/l2.py", "get", "cache_l2"),
    ("ragserve/cache/answers.py", "remember", "cache_write"),
    ("ragserve/cache/l2.py", "put", "cache_write"),
    ("ragserve/profiling/", "", "client"),
]
# The pipeline's own plumbing: time spent here, outside any stage, is pipeline overhead.
PLUMBING = ("ragserve/engine/", "ragserve/retrieval/retriever.py")
# Fallback by module, for code no root reaches (vLLM's output handler task, Redis writes).
MODULES: list[tuple[str, str]] = [
    ("/vllm/", "generate"), ("/zmq/", "generate"), ("/httpx/", "generate"), ("/httpcore/", "generate"),
    ("/sentence_transformers/", "embed"),
    ("/faiss/", "search"), ("/redis/", "cache_l2"), ("/ragserve/", "pipeline"),
    ("/asyncio/", "event loop"), ("/concurrent/", "event loop"), ("/threading.py", "event loop"),
    ("/selectors.py", "event loop"),
]
# Waiting, not working: an idle loop or worker sits in these.
IDLE = ("<method 'poll' of 'select.epoll' objects>", "<method 'get' of '_queue.SimpleQueue' objects>", "<method 'select' of 'select.poll' objects>",
        "<method 'acquire' of '_thread.lock' objects>", "<built-in method time.sleep>",
        "<method 'control' of 'select.kqueue' objects>")
NOT_STAGES = {"pipeline", "event loop", "idle", "client", "other"}


class ThreadProfiler:
    """One ``cProfile.Profile`` in the calling thread and in each thread the engine runs
    stages in (``RAG.run_in_threads``: the engine loop, the embedding worker)."""

    def __init__(self, rag: Any) -> None:
        self.rag = rag
        self.profiles: dict[str, cProfile.Profile] = {}

    def _enable(self, thread: str) -> None:
        p = self.profiles[thread] = cProfile.Profile()
        p.enable()

    def _disable(self, thread: str) -> None:
        self.profiles[thread].disable()

    def start(self) -> None:
        caller = self.profiles["caller"] = cProfile.Profile()
        self.rag.run_in_threads(self._enable)
        caller.enable()

    def stop(self) -> None:
        self.profiles["caller"].disable()
        self.rag.run_in_threads(self._disable)

    def dump(self, path: str | os.PathLike[str]) -> pstats.Stats:
        """Write each thread's profile beside ``path`` (``NAME.THREAD.prof``) and all of them
        merged to ``path``; returns the merged ``pstats.Stats``."""
        path = Path(path)
        parts = []
        for name, p in self.profiles.items():
            p.create_stats()
            if p.stats:  # type: ignore[attr-defined]  # a thread that ran nothing has no data
                part = path.with_name(f"{path.stem}.{name}{path.suffix}")
                p.dump_stats(part)
                parts.append(str(part))
        if not parts:
            raise RuntimeError("no profiled thread recorded any call")
        # Loaded from the files, so merging never mutates a profiler's own dict.
        merged = pstats.Stats(*parts)
        merged.dump_stats(path)
        return merged

    def thread_times(self) -> dict[str, dict[str, float]]:
        """Per thread: seconds of own time, and how much of it was waiting (``IDLE``)."""
        out = {}
        for name, p in self.profiles.items():
            p.create_stats()
            st = p.stats  # type: ignore[attr-defined]
            total = sum(v[2] for v in st.values())
            idle = sum(v[2] for f, v in st.items() if f[2] in IDLE)
            out[name] = {"own_s": round(total, 3), "idle_s": round(idle, 3), "busy_s": round(total - idle, 3)}
        return out


def _root(func: Func) -> str | None:
    path = func[0].replace("\\", "/")
    for frag, name, stage in ROOTS:
        if frag in path and (not name or func[2] == name):
            return stage
    return None


def _module(func: Func) -> str:
    if func[2] in IDLE:
        return "idle"
    path = "/" + func[0].replace("\\", "/")
    return next((stage for frag, stage in MODULES if frag in path), "other")


@dataclass
class StageGroup:
    own_s: float = 0.0
    functions: list[tuple[str, float, float]] = field(default_factory=list)
    """(function, own seconds attributed to this stage, cumulative seconds), by own time."""


def _propagate(edges: dict[Func, list[tuple[Func, float]]], shares: dict[Func, dict[str, float]],
               rounds: int) -> None:
    """Jacobi iteration: each free function takes its callers' time-weighted mix of stages."""
    for _ in range(rounds):
        moved = 0.0
        nxt = {}
        for func, known in edges.items():
            acc: dict[str, float] = {}
            weight = sum(w for _, w in known)
            for caller, w in known:
                for stage, x in shares[caller].items():
                    acc[stage] = acc.get(stage, 0.0) + x * w / weight
            old = shares[func]
            moved = max(moved, max((abs(acc.get(k, 0.0) - old.get(k, 0.0)) for k in {*acc, *old}), default=0.0))
            nxt[func] = acc
        shares.update(nxt)
        if moved < 1e-6:
            return


def attribute(stats: pstats.Stats, rounds: int = 200) -> dict[str, StageGroup]:
    """Own time of every function split over the stages it ran in.

    Fixed points: stage entry points (``ROOTS``), waiting (``IDLE``), the pipeline's own
    plumbing (``PLUMBING``: time there is pipeline overhead unless a stage is entered), and
    functions no profiled caller reaches (by their module, ``MODULES``). Every other function
    takes the time-weighted mix of its callers' stages, iterated to a fixed point (torch
    modules calling modules make the graph cyclic: one walk up the callers would cut cycles
    arbitrarily). Then a library function reached from no stage at all takes its module's
    stage — vLLM's output-handler task is generation — and the mix is propagated again.
    """
    raw: dict[Func, Any] = stats.stats  # type: ignore[attr-defined]
    shares: dict[Func, dict[str, float]] = {}
    edges: dict[Func, list[tuple[Func, float]]] = {}
    for func, (_, _, _, _, callers) in raw.items():
        direct = "idle" if func[2] in IDLE else _root(func)
        known = [(c, max(e[3], 1e-9)) for c, e in callers.items() if c in raw and c != func]
        if direct is None and any(frag in func[0].replace("\\", "/") for frag in PLUMBING):
            direct = "pipeline"
        if direct or not known:
            shares[func] = {direct or _module(func): 1.0}
        else:
            edges[func] = known
            shares[func] = {}
    for _ in range(4):
        _propagate(edges, shares, rounds)
        promoted = [f for f in edges if set(shares[f]) <= NOT_STAGES and _module(f) not in NOT_STAGES]
        if not promoted:
            break
        for f in promoted:
            shares[f] = {_module(f): 1.0}
            del edges[f]
    groups: dict[str, StageGroup] = {}
    for func, (_, _, tt, ct, _) in raw.items():
        share = shares[func] or {_module(func): 1.0}
        total = sum(share.values())
        for stage, x in share.items():
            g = groups.setdefault(stage, StageGroup())
            g.own_s += tt * x / total
            g.functions.append((_name(func), tt * x / total, ct * x / total))
    for g in groups.values():
        g.functions.sort(key=lambda f: -f[1])
    return dict(sorted(groups.items(), key=lambda kv: -kv[1].own_s))


def _name(func: Func) -> str:
    path, line, name = func
    if path == "~":
        return name
    for marker in ("site-packages/", "lib/python3", "ragserve/"):
        i = path.rfind(marker)
        if i >= 0:
            path = path[i + len(marker):] if marker != "ragserve/" else path[i:]
            break
    return f"{path}:{line}({name})"


def top_text(prof_path: str, n: int = 40) -> str:
    """pstats' own listing of the top ``n`` functions by cumulative and by own time."""
    buf = io.StringIO()
    st = pstats.Stats(prof_path, stream=buf)
    for key, title in (("cumulative", "cumulative time"), ("tottime", "own time")):
        buf.write(f"\n===== top {n} functions by {title} (all profiled threads merged) =====\n")
        st.sort_stats(key).print_stats(n)
    return buf.getvalue()


def stage_text(groups: dict[str, StageGroup], threads: dict[str, dict[str, float]], n: int = 12) -> str:
    """Per stage: own time attributed to it, and its top functions by own time."""
    busy = sum(g.own_s for s, g in groups.items() if s != "idle") or 1e-9
    lines = ["Threads profiled (own time = time inside profiled functions; idle = waiting in "
             "epoll / locks / sleep):"]
    for name, t in threads.items():
        lines.append(f"  {name:<20} own {t['own_s']:8.3f} s   idle {t['idle_s']:8.3f} s   busy {t['busy_s']:8.3f} s")
    lines.append("\nOwn time by pipeline stage (busy time only; a function used by several stages is "
                 "split by the time spent under each):")
    for stage, g in groups.items():
        share = "" if stage == "idle" else f" {100 * g.own_s / busy:5.1f}% of busy"
        lines.append(f"\n[{stage}] own {g.own_s:.3f} s{share}")
        for fname, own, cum in g.functions[:n]:
            lines.append(f"    {own:9.4f} s own  {cum:9.4f} s cum  {fname}")
    return "\n".join(lines) + "\n"
