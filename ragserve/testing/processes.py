"""``ragserve serve --ray`` as a supervisor runs it, and the processes it leaves behind.

Ray's own processes make their own sessions and process groups, so "nothing left" is checked
by a marker in the environment: every process the command starts inherits it.
``tests/test_ray_serve_process.py`` stops the command once per case;
``benchmarks/bench_stops.py`` repeats every case to catch a timing window.

Generation is a fake OpenAI server in the calling process; the cluster, Serve, the replicas,
Redis and the HTTP path are real.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ragserve.testing.fake_openai import Behaviour, FakeOpenAI
from ragserve.testing.http import running
from ragserve.testing.redis import redis_server

MARKER_ENV = "RAGSERVE_TEST_MARKER"


def marked(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker``: the command and everything it
    started, whatever their process group or session (Ray's own processes make their own)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if needle not in (p / "environ").read_bytes().split(b"\0"):
                continue
            if (p / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(p.name))
        except (OSError, IndexError):  # ended meanwhile, or not ours to read
            continue
    return found


def kill_marked(marker: str) -> int:
    """SIGKILL whatever still carries ``marker``; how many there were."""
    pids = marked(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


@contextmanager
def serve_ray(index: Path, folder: Path, replicas: int) -> Iterator[tuple[subprocess.Popen, Path, Path, str]]:
    """``ragserve serve INDEX --ray`` on a local cluster of its own, in a session of its own;
    yields the process, its ready file (the port, once it serves), its log and its marker.
    Whatever is left at the end is SIGKILLed."""
    marker = uuid.uuid4().hex
    fake = FakeOpenAI(Behaviour(token_delay_s=0.01))
    with redis_server() as redis, running(fake.app) as fake_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAGSERVE_RAY_"))}
        env.update({MARKER_ENV: marker, "RAGSERVE_RAY_ADDRESS": "local",
                    "RAGSERVE_RAY_LOCAL_NUM_CPUS": "2", "RAGSERVE_RAY_NUM_CPUS": "0.5",
                    "RAGSERVE_RAY_GENERATOR_NUM_CPUS": "0.5",
                    "RAGSERVE_GENERATE_BACKEND": "openai", "RAGSERVE_OPENAI_URLS": fake_url,
                    "RAGSERVE_OPENAI_TOKENIZER": "server", "RAGSERVE_GENERATE_MAX_TOKENS": "8",
                    "RAGSERVE_SERVER_DRAIN_GRACE_S": "10", "HF_HUB_OFFLINE": "1"})
        ready, log = folder / "port", folder / "serve.log"
        ready.unlink(missing_ok=True)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ragserve.cli", "serve", str(index), "--ray", "--replicas",
                 str(replicas), "--redis-url", redis.url, "--port", "0", "--ready-file", str(ready)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc, ready, log, marker
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            kill_marked(marker)
