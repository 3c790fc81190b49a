"""memory_profiler: line-by-line memory of chosen functions, and an mprof-style timeline of
this process and its children (vLLM's engine core, an embedded Redis) as a PNG.

**Usage:**

    timeline = MemoryTimeline(interval_s=0.1).start()
    with timeline.phase("timed pass"):
        ...
    timeline.stop(); timeline.plot("memory_timeline.png")

    result, text, lines = line_profile(build_index, (corpus, out), {}, extra=[read_corpus])
"""

from __future__ import annotations

import io
import linecache
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

MACHINE = "whole machine"


@dataclass
class Sample:
    t: float
    own_mib: float
    total_mib: float
    children: dict[int, float] = field(default_factory=dict)
    """RSS MiB per child pid (names in ``MemoryTimeline.names``: a child renames itself)."""
    cpu: dict[str | int, float] = field(default_factory=dict)
    """CPU % since the previous sample (100 = one core): "self", each child pid, "machine"."""


class MemoryTimeline:
    """Samples RSS of this process and of its children every ``interval_s`` on a thread.

    Own RSS and the total with children come from ``memory_profiler.memory_usage`` (with
    timestamps); the children are also named (psutil, which memory_profiler uses), so the
    chart can tell vLLM's engine core from this process. RSS counts shared pages in every
    process that maps them.
    """

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.phases: list[tuple[str, float, float]] = []
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.time()

    def start(self) -> MemoryTimeline:
        self._t0 = time.time()
        self._thread = threading.Thread(target=self._run, name="ragserve-memory-timeline", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import psutil
        from memory_profiler import memory_usage

        me = psutil.Process(os.getpid())
        me.cpu_percent(None)
        psutil.cpu_percent(None)
        cores = os.cpu_count() or 1
        procs: dict[int, Any] = {}  # psutil keeps the CPU counters per Process object
        while not self._stop.is_set():
            own, ts = memory_usage(os.getpid(), timestamps=True)[0]
            total = memory_usage(os.getpid(), include_children=True)[0]
            children: dict[int, float] = {}
            # "machine": every process on the host, in the same unit (100 = one core), so the
            # report can tell contention from other jobs apart from this run's own load.
            cpu: dict[str | int, float] = {"self": me.cpu_percent(None), "machine": psutil.cpu_percent(None) * cores}
            try:
                for c in me.children(recursive=True):
                    try:
                        if c.pid not in procs:
                            procs[c.pid] = c
                            c.cpu_percent(None)
                        p = procs[c.pid]
                        self.names[c.pid] = p.name()  # vLLM's engine core renames itself once started
                        children[c.pid] = p.memory_info().rss / 2**20
                        cpu[c.pid] = p.cpu_percent(None)
                    except psutil.Error:  # a child that ended between listing and reading
                        continue
            except psutil.Error:
                pass
            self.samples.append(Sample(ts - self._t0, own, total, children, cpu))
            self._stop.wait(self.interval_s)

    def stop(self) -> MemoryTimeline:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self

    def now(self) -> float:
        return time.time() - self._t0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.phases.append((name, start, self.now()))

    def _named(self, per_pid: dict[Any, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, v in per_pid.items():
            name = {"self": "this process", "machine": MACHINE}.get(pid) or self.names.get(pid, str(pid))
            out[name] = out.get(name, 0.0) + v
        return out

    def peak(self) -> dict[str, Any]:
        """The sample with the highest total, and the highest own RSS seen."""
        if not self.samples:
            return {}
        top = max(self.samples, key=lambda s: s.total_mib)
        return {"total_mib": round(top.total_mib, 1), "t_s": round(top.t, 2), "own_mib_then": round(top.own_mib, 1),
                "children_then": {k: round(v, 1) for k, v in self._named(top.children).items()},
                "own_peak_mib": round(max(s.own_mib for s in self.samples), 1)}

    def cpu_during(self, phase: str) -> dict[str, float]:
        """Mean CPU % per process over a phase (100 = one core busy)."""
        span = next(((a, b) for n, a, b in self.phases if n == phase), None)
        if span is None:
            return {}
        inside = [self._named(s.cpu) for s in self.samples if span[0] <= s.t <= span[1]]
        keys = {k for s in inside for k in s}
        return {k: round(sum(s.get(k, 0.0) for s in inside) / len(inside), 1) for k in keys} if inside else {}

    def to_dict(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s, "phases": self.phases, "child_names": self.names,
                "columns": ["t_s", "own_mib", "total_mib", "children_mib_by_pid", "cpu_percent"],
                "samples": [[round(s.t, 3), round(s.own_mib, 2), round(s.total_mib, 2), s.children, s.cpu]
                            for s in self.samples]}

    def plot(self, path: str | os.PathLike[str], title: str = "memory over the run") -> None:
        """Stacked RSS (this process, then each child by name), total line, phases shaded."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = [s.t for s in self.samples]
        named = [self._named(s.children) for s in self.samples]
        names = sorted({n for s in named for n in s})
        layers = [[s.own_mib for s in self.samples]] + [[s.get(n, 0.0) for s in named] for n in names]
        fig, ax = plt.subplots(figsize=(11, 5))
        ax.stackplot(t, layers, labels=["this process (RSS)"] + [f"child: {n}" for n in names], alpha=0.75)
        ax.plot(t, [s.total_mib for s in self.samples], color="black", lw=1, label="total incl. children")
        for i, (name, a, b) in enumerate(self.phases):
            ax.axvspan(a, b, color="grey", alpha=0.08 if i % 2 else 0.16)
            ax.text((a + b) / 2, 0.98, name, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=8)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("MiB (RSS)")
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


@dataclass(frozen=True)
class LineMemory:
    """One profiled line: where it is, its increment and the RSS after it (MiB)."""

    where: str
    source: str
    increment_mib: float
    mem_mib: float


def line_profile(func: Callable[..., Any], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                 extra: Sequence[Callable[..., Any]] = ()) -> tuple[Any, str, list[LineMemory]]:
    """Run ``func(*args, **kwargs)`` under memory_profiler's ``LineProfiler`` (psutil RSS
    after every line of ``func`` and of the ``extra`` functions it calls in this thread).

    Returns (func's result, memory_profiler's text report, the lines by increment).
    """
    from memory_profiler import LineProfiler, show_results

    class FocusedLineProfiler(LineProfiler):  # type: ignore[misc]
        # NOTE: memory_profiler's tracer asks for line events in every frame of the thread,
        # so torch and transformers ran far slower under it; frames it does not measure
        # need none (returning None from a "call" event turns them off for that frame).
        def trace_memory_usage(self, frame: Any, event: str, arg: Any) -> Any:
            if event == "call" and frame.f_code not in self.code_map and self._original_trace_function is None:
                return None
            return super().trace_memory_usage(frame, event, arg)

    lp = FocusedLineProfiler(backend="psutil")
    for f in extra:
        lp.add_function(f)
    result = lp(func)(*args, **(kwargs or {}))
    buf = io.StringIO()
    show_results(lp, stream=buf, precision=1)
    lines = []
    for filename, measured in lp.code_map.items():
        for lineno, m in measured:
            # The first line of a block reports the RSS at entry as its "increment": a baseline.
            if m is not None and abs(m[0] - m[1]) > 0.05:
                src = linecache.getline(filename, lineno).strip()
                short = filename.split("site-packages/")[-1].split("/wt5/")[-1]
                lines.append(LineMemory(f"{short}:{lineno}", src, round(m[0], 1), round(m[1], 1)))
    lines.sort(key=lambda x: -x.increment_mib)
    return result, buf.getvalue(), lines


def folder_mib(path: str | os.PathLike[str]) -> float:
    """Bytes of all files under a folder (model weights on disk), in MiB."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                continue
    return round(total / 2**20, 1)


def torch_module_mib(model: Any) -> float:
    """Parameter and buffer bytes of a torch module (the embedder held in this process)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(b.numel() * b.element_size() for b in model.buffers())
    return round(n / 2**20, 1)
