"""What the benchmarks and the soak share: where the checkout and its data are, logging,
percentiles, starting and stopping servers on loopback, CPU-seconds of processes, closed
loops of clients, and writing reports with the machine and versions at the top.

Every script here imports it (``import harness``) before anything of ragserve's: Python puts
a script's own folder first on ``sys.path``, so that works from any working directory; a
test that loads a module of this folder puts the folder on ``sys.path`` itself
(``tests/conftest.py``'s ``load_benchmark``). Importing it puts this checkout first on
``sys.path`` (a benchmark measures the ragserve it sits next to, not whatever the venv's
editable install points at) and sets ``HF_HUB_OFFLINE=1`` and ``TOKENIZERS_PARALLELISM=false``
unless they are set. At import it loads only ``ragserve.eval.scoring`` (so ``import
ragserve``); psutil, httpx and the rest load where they are used.

**Usage:**

    import harness

    log = harness.logger("bench")
    env = harness.environment(gpu=False)              # before the run: the load average then
    proc, url = harness.launch([...], env=..., log=tmp / "server.log", ready=tmp / "port")
    sampler = harness.CpuSampler(harness.process_name)
    a = sampler.snapshot(); wall = await harness.run_clients(items, 32, one); b = sampler.snapshot()
    harness.pct(latencies, 95)                        # the package's one percentile rule
    harness.write_report(text, md=args.out, json_path=args.json, data=raw)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
"""The project's scripts (``fake_serve.py``: ``ragserve serve`` over stand-in models)."""
XQUAD = REPO.parent / "shared" / "data" / "xquad-en" / "xquad.en.json"
"""XQuAD-en, the question set most benchmarks default to."""
XQUAD_INDEX = REPO / "indexes" / "xquad"
"""The index over XQuAD's paragraphs the serving benchmarks use (built when missing)."""

sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ragserve.eval.scoring import percentile  # noqa: E402

T = TypeVar("T")


def logger(name: str, stream: Any = None) -> Callable[[str], None]:
    """``log(msg)``: ``[name HH:MM:SS] msg``, flushed, on stderr (or ``stream``)."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=stream or sys.stderr, flush=True)

    return log


def parser(doc: str, *, raw: bool = True) -> argparse.ArgumentParser:
    """A script's argument parser, described by the first paragraph of its docstring (line
    breaks kept as written, unless ``raw`` is False)."""
    formatter = argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=formatter)


def xquad_arguments(ap: argparse.ArgumentParser, out: str, index_help: str | None = None) -> None:
    """``--index`` (``XQUAD_INDEX``), ``--xquad`` (``XQUAD``) and ``--out`` (``reports/<out>``)."""
    ap.add_argument("--index", type=Path, default=XQUAD_INDEX, help=index_help)
    ap.add_argument("--xquad", type=Path, default=XQUAD)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / out)


# -- numbers ---------------------------------------------------------------------------------


def pct(values: Sequence[float] | Any, q: float) -> float:
    """The ``q``-th percentile of ``values`` (a sequence or a numpy array) by the package's one
    rule, ``ragserve.eval.scoring.percentile`` (linear between the two nearest ranks, as
    numpy's default); NaN when there are none: a report shows "—" then, not a 0 that looks
    measured."""
    return float(percentile(list(values), q)) if len(values) else float("nan")


def pcts(values: Sequence[float] | Any, *qs: float) -> tuple[float, ...]:
    """``pct`` at each of ``qs``: ``p50, p99 = pcts(latencies, 50, 99)``."""
    return tuple(pct(values, q) for q in qs)


def fmt(x: Any, spec: str) -> str:
    """``format(x, spec)``, or "—" for None and NaN (not measured)."""
    return "—" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, T]:
    """(seconds, result) of ``fn(*args, **kwargs)``."""
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t, result


async def run_clients(items: Iterable[T], clients: int, one: Callable[[T], Awaitable[Any]]) -> float:
    """A closed loop: ``clients`` workers, each taking the next item as soon as its last one is
    done, so that ``clients`` requests stay in flight (the load a batch job or a busy server
    puts on the engine). ``one`` records what it measures; returns the loop's seconds."""
    todo = iter(items)

    async def worker() -> None:
        for item in todo:  # one shared iterator: asyncio runs one worker at a time
            await one(item)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - t0


# -- processes: servers on loopback --------------------------------------------------------


def launch(argv: Sequence[str], *, env: dict[str, str], log: Path, ready: Path, timeout_s: float = 300.0,
           poll_s: float = 0.1, cwd: Path | None = None,
           what: str = "the server") -> tuple[subprocess.Popen[bytes], str]:
    """Start a server that writes its port to the file ``ready`` once it accepts requests
    (``ragserve serve`` and ``scripts/fake_serve.py`` do with ``--ready-file``, which ``argv``
    passes), its output to ``log`` (a pipe nobody reads would fill up and stall it). Returns
    (process, ``http://127.0.0.1:PORT``); if it exits or ``timeout_s`` passes first, it is
    killed and SystemExit says so with its log's last lines. (``ragserve serve`` with the
    defaults: ``ragserve.server.process.ServerProcess``.)"""
    from ragserve.server.process import wait_until_ready

    with open(log, "wb") as out:
        proc = subprocess.Popen(list(argv), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    url = wait_until_ready(proc, ready, timeout_s, poll_s)
    if url is None:
        proc.kill()
        raise SystemExit(f"{what} did not start:\n{tail(log)}")
    return proc, url


def stop(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int | None, float]:
    """SIGTERM (a server drains), then wait up to ``timeout_s``; SIGKILL past it. Returns
    (exit status, or None when it had to be killed; seconds it took)."""
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s), time.perf_counter() - t
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None, time.perf_counter() - t


def tail(path: Path | None, lines: int = 60) -> str:
    """The last ``lines`` lines of a log file ("" if there is none)."""
    try:
        return "\n".join(Path(path).read_text("utf-8", "replace").splitlines()[-lines:]) if path else ""
    except OSError:
        return ""


async def until(done: Callable[[], bool], timeout_s: float, poll_s: float = 0.2) -> bool:
    """Wait until ``done()``; False if ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


def http_client(url: str | None = None, *, timeout: float, connections: int = 256) -> Any:
    """An ``httpx.AsyncClient`` (on ``url``, if given) keeping up to ``connections``
    connections alive: C clients in a closed loop need C."""
    import httpx

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=timeout, limits=limits, **({"base_url": url} if url else {}))


async def post_ok(client: Any, path: str, body: Any) -> Any:
    """``POST path`` with a JSON ``body``: the JSON answer, or RuntimeError("HTTP <status>:
    <text>") for any status but 200 (the benchmark records it as that request's error)."""
    r = await client.post(path, json=body)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    return r.json()


async def stream_query(client: Any, body: dict[str, Any]) -> tuple[float | None, list[str], dict[str, Any]]:
    """``POST /v1/query`` with ``body`` and ``"stream": true``, its Server-Sent Events read to the
    end: (seconds to the first ``token`` event, those events' data as sent, the ``done`` event's
    JSON). A non-200, an ``error`` event or a stream without ``done`` raises RuntimeError."""
    from ragserve.server.sse import read_events

    t0, ttft, tokens, done = time.perf_counter(), None, [], None
    async with client.stream("POST", "/v1/query", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for event, data in read_events(r.aiter_lines()):
            if event == "token":
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                tokens.append(data)
            elif event == "done":
                done = json.loads(data)
            elif event == "error":
                raise RuntimeError(data[:194])
    if done is None:
        raise RuntimeError("the stream ended without a done event")
    return ttft, tokens, done


async def stream_inprocess(rag: Any, question: str) -> tuple[float | None, list[str], Any]:
    """``rag.astream(question)`` read to the end: (seconds to the first token, the token texts,
    the ``QueryResult``); RuntimeError if it ends without one."""
    from ragserve.types import DoneEvent, TokenEvent

    t0, ttft, parts, result = time.perf_counter(), None, [], None
    async for ev in rag.astream(question):
        if isinstance(ev, TokenEvent):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            parts.append(ev.text)
        elif isinstance(ev, DoneEvent):
            result = ev.result
    if result is None:
        raise RuntimeError("the stream ended without a done event")
    return ttft, parts, result


async def reset_prefix_cache(client: Any, url: str = "/admin/reset_prefix_cache", *,
                             admin_key: str | None = None, field: str = "reset", attempts: int = 50,
                             what: str = "the server") -> None:
    """Empty vLLM's prefix cache through a server, so that a run starts cold: ragserve's
    ``POST /admin/reset_prefix_cache`` (``admin_key``; it answers ``{"reset": bool}``) or vLLM's
    own OpenAI server's ``POST /reset_prefix_cache`` (``field="success"``). vLLM refuses while
    a request that just finished still holds blocks: up to ``attempts`` tries 0.1 s apart,
    then RuntimeError (never measure on a cache that could not be emptied)."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    for _ in range(attempts):
        r = await client.post(url, headers=headers)
        r.raise_for_status()
        if r.json().get(field):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} refused to reset vLLM's prefix cache {attempts} times")


def process_tree(pid: int) -> set[int]:
    """``pid`` and every process below it (empty once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return {root.pid, *(c.pid for c in root.children(recursive=True))}
    except psutil.Error:
        return set()


def process_name(pid: int) -> str:
    """The process's name (``VLLM::EngineCore``, ``redis-server``, ``python``), or "exited"."""
    import psutil

    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "exited"


# -- CPU: where the two cores go -----------------------------------------------------------


def _busy(t: Any) -> float:
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


class CpuSampler:
    """CPU-seconds of this process (by thread), of each child process, and of the whole
    machine over one run. Counters are cumulative, so two snapshots give exact deltas;
    a thread sampler in the middle would only add noise of its own."""

    def __init__(self, label_of: Callable[[int], str]) -> None:
        self.label_of = label_of  # pid -> label, for processes this benchmark started

    def snapshot(self) -> dict[str, Any]:
        import psutil

        me = psutil.Process()
        procs: dict[int, float] = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                procs[p.pid] = t.user + t.system
            except psutil.Error:
                continue
        threads = {t.id: t.user_time + t.system_time for t in me.threads()}
        return {"t": time.perf_counter(), "procs": procs, "threads": threads,
                "machine": _busy(psutil.cpu_times())}

    def delta(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        """CPU-seconds between two snapshots: ``procs`` by label, ``threads`` of this process
        by name, ``ours_s`` (every process of ours), ``others_s`` (the rest of the machine)."""
        wall = b["t"] - a["t"]
        procs: dict[str, float] = {}
        for pid, sec in b["procs"].items():
            used = sec - a["procs"].get(pid, 0.0)
            if used > 0.005:
                label = self.label_of(pid)
                procs[label] = procs.get(label, 0.0) + used
        names = {t.native_id: re.sub(r"[_-]?\d+$", "", t.name) for t in threading.enumerate()}
        threads: dict[str, float] = {}
        for tid, sec in b["threads"].items():
            used = sec - a["threads"].get(tid, 0.0)
            if used > 0.05:
                name = names.get(tid, "native threads (torch/OpenMP, zmq, tokenizers)")
                threads[name] = threads.get(name, 0.0) + used
        ours = sum(procs.values())
        machine = b["machine"] - a["machine"]
        return {"wall_s": wall, "procs": procs, "threads": threads, "ours_s": ours,
                "others_s": max(machine - ours, 0.0), "machine_s": machine}


# -- reports -------------------------------------------------------------------------------


def environment(*extra: str, gpu: bool = True) -> dict[str, Any]:
    """The machine and versions (``ragserve.profiling.env.environment``) of its packages and
    ``extra`` ones. Take it before the run: its load average is then the machine's, not the
    run's. ``gpu=False`` does not import torch."""
    from ragserve.profiling.env import PACKAGES
    from ragserve.profiling.env import environment as read

    return read(PACKAGES + tuple(p for p in extra if p not in PACKAGES), gpu=gpu)


def machine_lines(env: dict[str, Any]) -> list[str]:
    """Two lines: CPU (flags), cores, RAM, GPU, load average; OS, Python, package versions."""
    from ragserve.profiling.env import machine_line, versions_line

    return [machine_line(env), versions_line(env)]


def run_lines(env: dict[str, Any]) -> list[str]:
    """The top of a report as markdown bullets: the command, the date, hardware, versions."""
    machine, versions = machine_lines(env)
    return [f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            f"- hardware: {machine}", f"- versions: {versions}"]


def to_json(data: Any) -> str:
    """JSON indented by one: numpy numbers and arrays as numbers, dataclasses as objects,
    paths and anything else as text."""
    return json.dumps(data, indent=1, default=_plain)


def _plain(o: Any) -> Any:
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    if type(o).__module__ == "numpy" and hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def write_report(text: str, md: Path | None = None, json_path: Path | None = None, data: Any = None,
                 echo: bool = True) -> None:
    """Print the markdown ``text`` (``echo``), write it to ``md`` and ``data`` as JSON
    (``to_json``) to ``json_path``; either path may be None, folders are made as needed."""
    if echo:
        print(text, flush=True)
    for path, content in ((md, text if text.endswith("\n") else text + "\n"),
                          (json_path, None if data is None else to_json(data))):
        if path is not None and content is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content, encoding="utf-8")
