"""``ragserve serve --ray`` as a process, stopped as a supervisor stops it: a stop signal is a
graceful stop whenever it comes (while deploying, or serving with 2 replicas), the command
exits 0, and no process it started is left: not the local Ray cluster, not a replica, not
Serve's proxy. Generation is a fake OpenAI server in this process; the cluster, Serve, the
replicas, Redis and the HTTP path are real (``ragserve/testing/processes.py``; every case
repeated: ``benchmarks/bench_stops.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from ragserve.ray.reaper import command_line
from ragserve.testing.processes import marked, none_left, serve_ray
from ragserve.testing.waits import CLUSTER_WAIT_S, HTTP_TIMEOUT_S, WAIT_S, eventually

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.http, pytest.mark.redis]

START_S = 600  # a local cluster, Serve, two ingress replicas with the embedding model: minutes here


def stopped_cleanly(proc: subprocess.Popen, log: Path, marker: str) -> None:
    rc = proc.wait(timeout=START_S)
    assert rc == 0, log.read_text(errors="replace")[-4000:]
    eventually(lambda: not marked(marker), CLUSTER_WAIT_S, 0.2, "every process the command started to end")


def test_sigterm_to_the_group_while_serving_with_2_replicas_exits_0_and_leaves_nothing(xquad_index, tmp_path):
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
        # The whole group, as `kill -- -PGID` and systemd's default KillMode=control-group: the
        # local cluster's GCS and raylet are in it. They used to die with the signal, and the
        # teardown then waited 60 s for the GCS and exited 1, leaving replicas behind.
        os.killpg(proc.pid, signal.SIGTERM)
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


def test_sigkill_of_the_command_while_serving_with_2_replicas_leaves_nothing(xquad_index, tmp_path):
    """``kill -9`` of the command alone (the OOM killer, a supervisor's last resort): nothing
    runs in it, Ray's GCS and raylet fate-share with it, and its reaper (``ray/reaper.py``)
    ends the rest. Without the reaper the raylet's two agents stayed about 60 s."""
    with serve_ray(xquad_index, tmp_path, replicas=2) as (proc, ready, log, marker):
        eventually(lambda: ready.is_file() or proc.poll() is not None, START_S, 0.2,
                   "the application to be up")
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        eventually(lambda: any("DashboardAgent" in command_line(p) for p in marked(marker)), CLUSTER_WAIT_S, 0.2,
                   "the raylet's agents to be up")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=WAIT_S) == -signal.SIGKILL
        eventually(lambda: none_left(marker), WAIT_S, 0.2, "every process the command started to end",
                   ignore=(AssertionError,))


