"""A local Ray cluster ends with the process that started it, however that process ends.

``ray.init(address="local")`` starts the cluster's processes (GCS, raylet, agents, workers)
and ``ray.shutdown`` stops them. When the starting process is SIGKILLed (``kill -9``, the
OOM killer, a supervisor's last resort) nothing runs in it: Ray's GCS and raylet fate-share
with it, but the raylet's two agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) then
try to report the raylet's death to the dead GCS and stay about 60 s (a timeout fixed in
Ray), and anything a worker started is on its own.

So a small reaper process waits for the starter to end, then SIGKILLs the cluster's
processes. Which processes those are:

- **the roots**: processes whose environment carries ``RAGSERVE_CLUSTER=<token>`` (set in
  the starter only while ``ray.init`` starts the cluster, and inherited by everything the
  cluster starts) *and* whose command line names the Ray package's folder. The second test
  keeps out a process another thread of the starter happened to start in that window.
- **their descendants**, by parent pid. Ray's agents retitle themselves (``setproctitle``),
  which blanks their ``/proc/PID/environ``; they are the raylet's children. So while the
  starter lives the reaper records the tree every ``WATCH_S`` (pid and start time: a pid
  reused later is not taken for a member), and a descendant stays known after its parent
  has ended. One started in the last ``WATCH_S`` under a parent that died with the starter
  can be missed.

The reaper runs in a session of its own (a signal to the starter's process group does not
reach it), holds SIGTERM and SIGHUP blocked and ignores SIGINT, so only the starter's end or
``LocalClusterReaper.done`` (after a graceful ``ray.shutdown``: leftovers are reaped then,
and the reaper ends with the cluster) sets it off. It needs Linux's ``/proc``; without it,
or if the reaper cannot start, the cluster runs unbound, with a warning.

**Usage:** ``reaper = LocalClusterReaper.start(tag=ray_dir); with reaper.marking(): ray.init(...)``;
after ``ray.shutdown()``: ``reaper.done()``.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ragserve.generators.lifeline import Proc, pidfd, process, process_table

log = logging.getLogger("ragserve.ray")

ENV = "RAGSERVE_CLUSTER"
"""The marker the roots of a local cluster started here carry."""
REAP_S = 10.0
"""The longest the reaper keeps killing what it finds."""
WATCH_S = 0.5
"""How often the reaper records the cluster's processes while the starter lives (and,
without pidfds, kernels before 5.3, checks that the starter still lives)."""
READY_S = 30.0
"""How long the starter waits for the reaper's first record before going on without it."""


def carries(pid: int, name: str, value: str) -> bool:
    """Whether ``pid``'s environment (as it was at exec) has ``name=value``."""
    try:
        return f"{name}={value}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # ended, or not ours to read
        return False


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class ProcessTree:
    """The processes ``is_root`` takes and their descendants, as last recorded. ``starter``:
    the process that starts the roots (its children are judged again until they are roots)."""

    def __init__(self, is_root: Callable[[int], bool], *, starter: int, exclude: int | None = None) -> None:
        self._is_root, self._starter, self._exclude = is_root, starter, exclude
        self._judged: dict[tuple[int, int], bool] = {}  # (pid, start) -> is a root; exec-time facts
        self.members: dict[int, int] = {}
        """pid -> start time of every member seen and not yet known to have ended."""
        self._lock = threading.Lock()  # a test records from a thread while it asks

    def update(self) -> None:
        """Record the members alive now; members that ended are forgotten."""
        live = process_table()
        with self._lock:
            members = {pid: t for pid, t in self.members.items() if pid in live and live[pid].start == t}
            children: dict[int, list[int]] = {}
            for pid, proc in live.items():
                children.setdefault(proc.ppid, []).append(pid)
                if pid not in members and pid != self._exclude and self._root(pid, proc):
                    members[pid] = proc.start
            todo = list(members)
            while todo:  # every descendant of a member, breadth first
                for child in children.get(todo.pop(), ()):
                    if child not in members and child != self._exclude:
                        members[child] = live[child].start
                        todo.append(child)
            self.members = members
            self._judged = {k: v for k, v in self._judged.items() if k[0] in live and live[k[0]].start == k[1]}

    def _root(self, pid: int, proc: Proc) -> bool:
        key = (pid, proc.start)
        if key not in self._judged:
            judged = self._is_root(pid)
            # NOTE: a child of the starter seen between its fork and its exec still shows the
            # starter's environment and command line (and keeps its start time through the
            # exec): a "no" for it may not last, so it is asked again at the next record.
            if judged or proc.ppid != self._starter:
                self._judged[key] = judged
            return judged
        return self._judged[key]

    def kill(self, bound_s: float = REAP_S) -> int:
        """SIGKILL every member, pass after pass, until a pass finds none alive (or
        ``bound_s`` passes); how many processes were killed."""
        killed: set[int] = set()
        deadline = time.monotonic() + bound_s
        while True:
            self.update()
            with self._lock:
                members = dict(self.members)
            for pid, start in members.items():
                if _kill(pid, start):
                    killed.add(pid)
            if not members or time.monotonic() > deadline:
                return len(killed)
            time.sleep(0.05)


def _kill(pid: int, start: int) -> bool:
    """SIGKILL ``pid`` if it is still the process that started at ``start``: through a
    pidfd, so a pid reused between the check and the signal is not hit."""
    try:
        fd = pidfd(pid)
    except ProcessLookupError:
        return False
    try:
        if (proc := process(pid)) is None or proc.start != start:
            return False
        if fd is not None:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):  # ended; or reused by another user's process
        return False
    finally:
        if fd is not None:
            os.close(fd)


def pythonpath() -> str:
    """``PYTHONPATH`` with the folder this ragserve is imported from first: a child
    interpreter (the reaper, a local cluster's workers) imports the same ragserve, also
    when it is on ``sys.path`` by hand (a script's checkout) rather than installed."""
    here = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here])


class LocalClusterReaper:
    """The reaper of one local cluster, seen from the process that starts the cluster."""

    def __init__(self, token: str, proc: subprocess.Popen | None) -> None:
        self.token, self._proc = token, proc

    @classmethod
    def start(cls, tag: str) -> LocalClusterReaper:
        """Start the reaper and wait for its first record. ``tag``: what a root's command
        line contains (the Ray package's folder)."""
        token = uuid.uuid4().hex
        if not Path("/proc/self/stat").exists():
            log.warning("a local Ray cluster started here is not bound to this process: no /proc to "
                        "find its processes by; if this process is killed, stop the cluster with `ray stop`")
            return cls(token, None)
        proc = subprocess.Popen([sys.executable, "-m", "ragserve.ray.reaper", str(os.getpid()), token, tag],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": pythonpath()})
        ready, _, _ = select.select([proc.stdout], [], [], READY_S)
        if not ready or proc.stdout.readline().strip() != b"ready":
            proc.kill()
            log.warning("a local Ray cluster started here is not bound to this process: its reaper did not "
                        "start (exit %s); if this process is killed, stop the cluster with `ray stop`", proc.wait())
            return cls(token, None)
        return cls(token, proc)

    @contextmanager
    def marking(self) -> Iterator[None]:
        """Processes started inside this block carry the marker (and so can be roots)."""
        before = os.environ.get(ENV)
        os.environ[ENV] = self.token
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = before

    def done(self, timeout_s: float = REAP_S + 5) -> None:
        """The cluster was shut down: reap what is left of it now, and let the reaper end."""
        if self._proc is None:
            return
        self._proc.stdin.close()
        try:
            code = self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        if code != 0:
            log.warning("the local Ray cluster's reaper ended with status %s: some of its processes may be left", code)


def _watch(parent: int, tree: ProcessTree) -> None:
    """Record ``tree`` every ``WATCH_S`` until ``parent`` has ended or closed our stdin;
    says ``ready`` on stdout after the first record."""
    try:
        fd = pidfd(parent)
    except ProcessLookupError:
        return
    watched = [sys.stdin] + ([fd] if fd is not None else [])
    said = False
    while os.getppid() == parent:  # else it ended before the pidfd was open (its pid may be reused)
        tree.update()
        if not said:
            print("ready", flush=True)
            said = True
        ready, _, _ = select.select(watched, [], [], WATCH_S)
        if fd in ready:
            return
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 4096):
            return


def main(argv: list[str]) -> None:
    parent, token, tag = int(argv[0]), argv[1], argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the starter's Ctrl-C is the starter's
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})  # `pkill -f ragserve`
    me = os.getpid()
    tree = ProcessTree(lambda pid: carries(pid, ENV, token) and tag in command_line(pid), starter=parent,
                       exclude=me)
    _watch(parent, tree)
    tree.kill()


if __name__ == "__main__":
    main(sys.argv[1:])
