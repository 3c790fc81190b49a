"""``ragserve ... --ray`` commands as a supervisor runs them, and the processes they leave behind.

Ray's own processes make their own sessions and process groups, so "nothing left" is checked
by a marker in the environment, which every process the command starts inherits, and by
descent: Ray's agents blank their environment when they retitle themselves, so the tree is
recorded while the command runs (``marked``).
``tests/test_ray_serve_process.py`` stops ``serve --ray`` once per case and
``tests/test_ray_kill.py`` kills ``batch --ray`` and ``build-index --ray`` and their actors;
``benchmarks/bench_stops.py`` repeats every case to catch a timing window.

Generation is a fake OpenAI server in the calling process; the cluster, Serve, the replicas,
Redis and the HTTP path are real.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ragserve.ray.reaper import ProcessTree, carries, command_line
from ragserve.testing.fake_openai import Behaviour, FakeOpenAI
from ragserve.testing.http import running
from ragserve.testing.redis import redis_server

MARKER_ENV = "RAGSERVE_TEST_MARKER"


_trees: dict[str, ProcessTree] = {}
"""The process tree of each command ``ragserve_ray`` runs, recorded while it runs."""
RECORD_S = 0.2


def marked(marker: str) -> list[int]:
    """Live processes the command carrying ``marker`` started: those whose environment
    carries it and their descendants, whatever their process group or session (Ray's own
    processes make their own). Ray's agents blank their environment when they retitle
    themselves, so ``ragserve_ray`` records the tree while the command runs
    (``ray.reaper.ProcessTree``); a descendant whose parent ended is known from that record."""
    tree = _trees.get(marker) or _tree(marker)
    tree.update()
    return sorted(tree.members)


def kill_marked(marker: str) -> int:
    """SIGKILL whatever ``marked`` finds, until none is left; how many there were."""
    return (_trees.get(marker) or _tree(marker)).kill()


def _tree(marker: str) -> ProcessTree:
    return ProcessTree(lambda pid: carries(pid, MARKER_ENV, marker), starter=os.getpid())


@contextmanager
def _recorded(marker: str) -> Iterator[None]:
    tree = _trees[marker] = _tree(marker)
    stop = threading.Event()

    def record() -> None:
        while not stop.wait(RECORD_S):
            tree.update()

    thread = threading.Thread(target=record, name=f"record-{marker[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _trees.pop(marker, None)


def none_left(marker: str) -> bool:
    """True when nothing of the command carrying ``marker`` is alive; else an AssertionError
    naming what is (for ``eventually(..., ignore=(AssertionError,))``)."""
    left = marked(marker)
    assert not left, [(pid, command_line(pid)[:80]) for pid in left]
    return True


def titled(marker: str, text: str) -> list[int]:
    """The live processes of the command carrying ``marker`` whose title contains ``text``."""
    return [pid for pid in marked(marker) if text in command_line(pid)]


@contextmanager
def ragserve_ray(args: list[str], folder: Path, env: dict[str, str] | None = None,
                 ) -> Iterator[tuple[subprocess.Popen, Path, str]]:
    """``ragserve ARGS`` (a ``--ray`` command) on a local cluster of its own (2 CPUs), in a
    session of its own, its process tree recorded while it runs (``marked``); yields the
    process, its log and its marker. ``env``: more of the command's environment. Whatever
    is left at the end is SIGKILLed."""
    marker = uuid.uuid4().hex
    full = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAGSERVE_RAY_"))}
    full.update({MARKER_ENV: marker, "RAGSERVE_RAY_ADDRESS": "local", "RAGSERVE_RAY_LOCAL_NUM_CPUS": "2",
                 "HF_HUB_OFFLINE": "1", **(env or {})})
    log = folder / f"{args[0]}-{marker[:8]}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ragserve.cli", *args], env=full, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    with _recorded(marker):
        try:
            yield proc, log, marker
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            kill_marked(marker)


def openai_env(url: str) -> dict[str, str]:
    """The environment that points a command's generation at a fake OpenAI server."""
    return {"RAGSERVE_GENERATE_BACKEND": "openai", "RAGSERVE_OPENAI_URLS": url,
            "RAGSERVE_OPENAI_TOKENIZER": "server", "RAGSERVE_GENERATE_MAX_TOKENS": "8"}


@contextmanager
def serve_ray(index: Path, folder: Path, replicas: int) -> Iterator[tuple[subprocess.Popen, Path, Path, str]]:
    """``ragserve serve INDEX --ray`` on a local cluster of its own, in a session of its own;
    yields the process, its ready file (the port, once it serves), its log and its marker.
    Whatever is left at the end is SIGKILLed."""
    fake = FakeOpenAI(Behaviour(token_delay_s=0.01))
    with redis_server() as redis, running(fake.app) as fake_url:
        env = {**openai_env(fake_url), "RAGSERVE_RAY_NUM_CPUS": "0.5",
               "RAGSERVE_RAY_GENERATOR_NUM_CPUS": "0.5", "RAGSERVE_SERVER_DRAIN_GRACE_S": "10"}
        ready = folder / "port"
        ready.unlink(missing_ok=True)
        args = ["serve", str(index), "--ray", "--replicas", str(replicas), "--redis-url", redis.url,
                "--port", "0", "--ready-file", str(ready)]
        with ragserve_ray(args, folder, env) as (proc, log, marker):
            yield proc, ready, log, marker
