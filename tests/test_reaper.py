"""A local Ray cluster's reaper (``ragserve/ray/reaper.py``), without Ray: a starter process
marks a child as a cluster process would be marked, in a session of its own as Ray's
workers are. The child starts a grandchild with a blank environment (as Ray's agents blank
theirs) and ends, as the raylet does before its agents. The grandchild must end when the
starter is SIGKILLed, or when the starter says the cluster is done, and not before; a
process the starter started without the marker is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from ragserve.ray.reaper import ENV, WATCH_S, carrying
from ragserve.testing.waits import WAIT_S, eventually

CHILD = textwrap.dedent("""
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env={})
    print(grandchild.pid, flush=True)
    time.sleep(float(sys.argv[1]))
""")
STARTER = textwrap.dedent("""
    import subprocess, sys, time
    from ragserve.ray.reaper import LocalClusterReaper
    mode, child_code, child_s = sys.argv[1:]
    reaper = LocalClusterReaper.start()
    with reaper.marking():
        child = subprocess.Popen([sys.executable, "-c", child_code, child_s], start_new_session=True,
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    unmarked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    print(reaper.token, child.pid, unmarked.pid, child.stdout.readline().decode().strip(), flush=True)
    child.wait()
    if mode == "done":
        sys.stdin.readline()
        reaper.done()
        print("done", flush=True)
    time.sleep(600)
""")


def start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, str, int, int]:
    """The starter, the marker, an unmarked process, and the grandchild, once its parent (the
    child) has ended: then only the reaper's record of the tree knows it."""
    proc = subprocess.Popen([sys.executable, "-c", STARTER, mode, CHILD, str(4 * WATCH_S)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp_path)
    token, child, unmarked, grandchild = proc.stdout.readline().split()
    assert carrying(ENV, token) == [int(child)]  # only what was started while marking; not the blank grandchild
    eventually(lambda: not alive(int(child)), WAIT_S, 0.05, "the child to end")
    return proc, token, int(unmarked), int(grandchild)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_sigkilled_starter_takes_its_cluster_with_it(tmp_path):
    proc, token, unmarked, grandchild = start(tmp_path, "kill")
    try:
        assert alive(grandchild)
        os.killpg(proc.pid, signal.SIGKILL)  # the starter's whole group: the reaper is not in it
        proc.wait()
        eventually(lambda: not alive(grandchild), WAIT_S, 0.05, "the orphaned grandchild to be reaped")
        assert alive(unmarked)
    finally:
        stop(grandchild, unmarked)


def test_done_reaps_what_the_cluster_left_and_the_starter_lives_on(tmp_path):
    proc, token, unmarked, grandchild = start(tmp_path, "done")
    try:
        assert alive(grandchild)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"  # done() waited for the reaper to finish
        assert not alive(grandchild) and alive(unmarked) and proc.poll() is None
    finally:
        stop(proc.pid, grandchild, unmarked)
