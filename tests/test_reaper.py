"""A local Ray cluster's reaper (``ragserve/ray/reaper.py``), without Ray.

``ProcessTree`` in process: a root's descendant stays a member after its parent ends (as
Ray's agents outlive the raylet), with a blank environment (as the agents blank theirs), and
``kill`` ends it and nothing else. Then the reaper process itself: a starter marks a child
whose command line has the tag (as Ray's processes name the Ray package), in a session of
its own as Ray's workers are; the child and its grandchild must end when the starter is
SIGKILLed, or when the starter says the cluster is done, and not before. A marked process
without the tag (another thread's child) and a tagged one without the marker are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from ragserve.generators.lifeline import process
from ragserve.ray.reaper import ProcessTree
from ragserve.testing.waits import WAIT_S, eventually

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env={})
    print(grandchild.pid, flush=True)
    sys.stdin.readline() if sys.argv[1:] == ["until-stdin"] else time.sleep(600)
""")
STARTER = textwrap.dedent("""
    import os, subprocess, sys, time
    from ragserve.ray.reaper import LocalClusterReaper
    mode, parent_code, tag = sys.argv[1:]
    reaper = LocalClusterReaper.start(tag=tag)
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    with reaper.marking():
        child = subprocess.Popen([sys.executable, "-c", parent_code, tag], start_new_session=True,
                                 stdout=subprocess.PIPE)
        untagged = subprocess.Popen(sleep, start_new_session=True)
    unmarked = subprocess.Popen(sleep + [tag], start_new_session=True)
    grandchild = child.stdout.readline().decode().strip()
    print(child.pid, grandchild, untagged.pid, unmarked.pid, flush=True)
    if mode == "done":
        sys.stdin.readline()
        reaper.done()
        print("done", flush=True)
    time.sleep(600)
""")


def alive(pid: int) -> bool:
    return process(pid) is not None


def stop(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_descendant_stays_a_member_after_its_parent_ends_and_kill_ends_only_members():
    parent = subprocess.Popen([sys.executable, "-c", PARENT, "until-stdin"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    other = subprocess.Popen(SLEEP)
    grandchild = int(parent.stdout.readline())
    try:
        tree = ProcessTree(lambda pid: pid == parent.pid, starter=os.getpid())
        tree.update()
        assert set(tree.members) == {parent.pid, grandchild}
        parent.stdin.close()  # the parent ends; its child is an orphan now
        parent.wait()
        tree.update()
        assert set(tree.members) == {grandchild}  # known by the record, not by its parent
        assert tree.kill() == 1
        eventually(lambda: not alive(grandchild), WAIT_S, 0.05, "the grandchild to end")
        assert alive(other.pid)
    finally:
        stop(parent.pid, grandchild, other.pid)


def start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, list[int]]:
    """The starter, and the pids of: the tagged marked child, its grandchild, an untagged
    marked process and a tagged unmarked one."""
    tag = f"ragserve-test-{uuid.uuid4().hex}"
    proc = subprocess.Popen([sys.executable, "-c", STARTER, mode, PARENT, tag], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp_path)
    return proc, [int(p) for p in proc.stdout.readline().split()]


def test_a_sigkilled_starter_takes_its_cluster_with_it(tmp_path):
    proc, pids = start(tmp_path, "kill")
    child, grandchild, untagged, unmarked = pids
    try:
        assert all(alive(p) for p in pids)
        os.killpg(proc.pid, signal.SIGKILL)  # the starter's whole group: the reaper is not in it
        proc.wait()
        eventually(lambda: not alive(child) and not alive(grandchild), WAIT_S, 0.05, "the cluster to be reaped")
        assert alive(untagged) and alive(unmarked)
    finally:
        stop(*pids)


def test_done_reaps_what_the_cluster_left_and_the_starter_lives_on(tmp_path):
    proc, pids = start(tmp_path, "done")
    child, grandchild, untagged, unmarked = pids
    try:
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"  # done() waited for the reaper to finish
        assert not alive(child) and not alive(grandchild)
        assert alive(untagged) and alive(unmarked) and proc.poll() is None
    finally:
        stop(proc.pid, *pids)


def test_a_child_of_the_starter_judged_before_its_exec_is_judged_again():
    """Between fork and exec a child shows its starter's environment and command line, so
    a first "not a root" for it must not stick (its start time stays the same through exec)."""
    child = subprocess.Popen(SLEEP)
    try:
        answers = iter([False, True])  # before its exec, then after
        tree = ProcessTree(lambda pid: pid == child.pid and next(answers), starter=os.getpid())
        tree.update()
        assert child.pid not in tree.members
        tree.update()
        assert child.pid in tree.members
    finally:
        stop(child.pid)
