"""``ragserve serve --ray`` as a process, stopped as a supervisor stops it: a stop signal is a
graceful stop whenever it comes (while deploying, or serving with 2 replicas), the command
exits 0, and no process it started is left: not the local Ray cluster, not a replica, not
Serve's proxy. Generation is a fake OpenAI server in this process; the cluster, Serve, the
replicas, Redis and the HTTP path are real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from ragserve.testing.fake_openai import Behaviour, FakeOpenAI
from ragserve.testing.http import running
from ragserve.testing.redis import redis_server
from ragserve.testing.waits import CLUSTER_WAIT_S, HTTP_TIMEOUT_S, eventually

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.http, pytest.mark.redis]

START_S = 600  # a local cluster, Serve, two ingress replicas with the embedding model: minutes here


def marked(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker``: the command and everything it
    started, whatever their process group or session (Ray's own processes make their own)."""
    needle = f"RAGSERVE_TEST_MARKER={marker}".encode()
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


@contextmanager
def serve_ray(index: Path, tmp_path: Path, replicas: int) -> Iterator[tuple[subprocess.Popen, Path, Path,
                                                                           str]]:
    """``ragserve serve INDEX --ray`` on a cluster of its own; yields the process, its ready
    file, its log and its marker. Whatever is left at the end is SIGKILLed."""
    marker = uuid.uuid4().hex
    fake = FakeOpenAI(Behaviour(token_delay_s=0.01))
    with redis_server() as redis, running(fake.app) as fake_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAGSERVE_RAY_"))}
        env.update({"RAGSERVE_TEST_MARKER": marker, "RAGSERVE_RAY_ADDRESS": "local",
                    "RAGSERVE_RAY_LOCAL_NUM_CPUS": "2", "RAGSERVE_RAY_NUM_CPUS": "0.5",
                    "RAGSERVE_RAY_GENERATOR_NUM_CPUS": "0.5",
                    "RAGSERVE_GENERATE_BACKEND": "openai", "RAGSERVE_OPENAI_URLS": fake_url,
                    "RAGSERVE_OPENAI_TOKENIZER": "server", "RAGSERVE_GENERATE_MAX_TOKENS": "8",
                    "RAGSERVE_SERVER_DRAIN_GRACE_S": "10", "HF_HUB_OFFLINE": "1"})
        ready, log = tmp_path / "port", tmp_path / "serve.log"
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
            for pid in marked(marker):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def stopped_cleanly(proc: subprocess.Popen, log: Path, marker: str) -> None:
    rc = proc.wait(timeout=START_S)
    assert rc == 0, log.read_text(errors="replace")[-4000:]
    eventually(lambda: not marked(marker), CLUSTER_WAIT_S, 0.2, "every process the command started to end")


def test_sigterm_while_serving_with_2_replicas_exits_0_and_leaves_nothing(xquad_index, tmp_path):
    with serve_ray(xquad_index, tmp_path, replicas=2) as (proc, ready, log, marker):
        eventually(lambda: ready.is_file() or proc.poll() is not None, START_S, 0.2,
                   "the application to be up")
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        url = f"http://127.0.0.1:{int(ready.read_text())}"
        eventually(lambda: httpx.get(f"{url}/health", timeout=HTTP_TIMEOUT_S).status_code == 200,
                   CLUSTER_WAIT_S, 0.2, "Serve's proxy to route /health", ignore=(httpx.HTTPError,))
        r = httpx.post(f"{url}/v1/query", json={"question": "Who won Super Bowl 50?"}, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200 and r.json()["answer"], r.text
        assert len(marked(marker)) > 3  # the command, the cluster's processes, the replicas
        proc.send_signal(signal.SIGTERM)  # the command's own process, as `systemctl stop` with KillMode=mixed
        stopped_cleanly(proc, log, marker)
        assert "stopping: deleting application" in log.read_text(errors="replace")


def test_sigint_to_the_group_while_deploying_exits_0_and_leaves_nothing(xquad_index, tmp_path):
    with serve_ray(xquad_index, tmp_path, replicas=1) as (proc, ready, log, marker):
        eventually(lambda: "deploying" in log.read_text(errors="replace") or proc.poll() is not None,
                   START_S, 0.1, "the deployment to begin")
        assert proc.poll() is None and not ready.exists(), log.read_text(errors="replace")[-4000:]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in its terminal: the whole foreground group
        stopped_cleanly(proc, log, marker)
        assert "SIGINT while deploying" in log.read_text(errors="replace")
