"""A local Ray cluster ends with the process that started it, however that process ends.

``ray.init(address="local")`` starts the cluster's processes (GCS, raylet, agents, workers)
and ``ray.shutdown`` stops them. When the starting process is SIGKILLed (``kill -9``, the
OOM killer, a supervisor's last resort) nothing runs in it: Ray's GCS and raylet fate-share
with it, but the raylet's two agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) then
try to report the raylet's death to the dead GCS and stay about 60 s (a timeout fixed in
Ray), and anything a worker started is on its own.

So the processes of a local cluster carry a marker in their environment
(``RAGSERVE_CLUSTER=<token>``, set only while ``ray.init`` starts them: every process the
cluster starts inherits it, whatever its session or process group), and a small reaper
process waits for the starter to end, then SIGKILLs the cluster's processes.

The cluster's processes are those that carry the marker and their descendants. The marker
alone is not enough: Ray's agents retitle themselves (``setproctitle``), which blanks their
``/proc/PID/environ``. So while the starter lives, the reaper records the tree every
``WATCH_S`` (pid and start time: a pid reused later is not taken for a member), and the
descendants stay known after their parent (the raylet) is gone. A process started in the
last ``WATCH_S`` under a parent that died with the starter can be missed.

- The reaper runs in a session of its own, so a signal to the starter's process group
  (``kill -- -PGID``, Ctrl-C) does not reach it.
- It wakes when the starter ends (a pidfd of it) or closes the reaper's stdin, which
  ``LocalClusterReaper.done`` does after a graceful ``ray.shutdown``: leftovers are reaped
  then, and the reaper ends with the cluster rather than with the process.
- It kills in passes until nothing carrying the marker is left (a dying raylet may still
  start a worker), bounded by ``REAP_S``.

**Usage:** ``reaper = LocalClusterReaper.start(); with reaper.marking(): ray.init(...)``;
after ``ray.shutdown()``: ``reaper.done()``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "RAGSERVE_CLUSTER"
"""The marker every process of a local cluster started here carries."""
REAP_S = 10.0
"""The longest the reaper keeps killing what it finds."""
WATCH_S = 0.5
"""How often the reaper records the cluster's processes while the starter lives (and,
without pidfds, kernels before 5.3, checks that the starter still lives)."""


def carrying(name: str, value: str, *, exclude: int | None = None) -> list[int]:
    """Live processes (not zombies) whose environment has ``name=value``, whatever their
    process group or session. Processes this user may not read are skipped."""
    needle = f"{name}={value}".encode()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == exclude:
            continue
        try:
            if needle not in (p / "environ").read_bytes().split(b"\0"):
                continue
            if (p / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(p.name))
        except (OSError, IndexError):  # ended meanwhile, or not ours to read
            continue
    return found


def _live() -> dict[int, tuple[int, int]]:
    """Every live process (not a zombie): pid -> (parent pid, start time in clock ticks)."""
    table = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # ended meanwhile
            continue
        if fields[0] != "Z":
            table[int(p.name)] = (int(fields[1]), int(fields[19]))
    return table


class ClusterTree:
    """The processes that carry ``name=value`` and their descendants, as last recorded."""

    def __init__(self, name: str, value: str, *, exclude: int | None = None) -> None:
        self._needle = f"{name}={value}".encode()
        self._exclude = exclude
        self.members: dict[int, int] = {}
        """pid -> start time of every member seen and not yet known to have ended."""
        self._lock = threading.Lock()  # a test records from a thread while it asks

    def update(self) -> dict[int, tuple[int, int]]:
        """Record the members alive now (members that ended are forgotten); the table read."""
        live = _live()
        with self._lock:
            members = {pid: t for pid, t in self.members.items() if live.get(pid, (0, -1))[1] == t}
            grew = True
            while grew:  # a child can be listed before its parent
                grew = False
                for pid, (ppid, t) in live.items():
                    if pid in members or pid == self._exclude:
                        continue
                    if ppid in members or self._carries(pid):
                        members[pid] = t
                        grew = True
            self.members = members
        return live

    def _carries(self, pid: int) -> bool:
        try:
            return self._needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False

    def kill(self, bound_s: float = REAP_S) -> int:
        """SIGKILL every member, pass after pass, until a pass finds none alive (or
        ``bound_s`` passes); how many processes were killed."""
        killed: set[int] = set()
        deadline = time.monotonic() + bound_s
        while True:
            self.update()
            for pid in list(self.members):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            if not self.members or time.monotonic() > deadline:
                return len(killed)
            time.sleep(0.05)


class LocalClusterReaper:
    """The reaper of one local cluster, seen from the process that starts the cluster."""

    def __init__(self, token: str, proc: subprocess.Popen) -> None:
        self.token, self._proc = token, proc

    @classmethod
    def start(cls) -> LocalClusterReaper:
        token = uuid.uuid4().hex
        proc = subprocess.Popen([sys.executable, "-m", "ragserve.ray.reaper", str(os.getpid()), token],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
        return cls(token, proc)

    @contextmanager
    def marking(self) -> Iterator[None]:
        """Processes started inside this block carry the marker (and so are reaped)."""
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
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def _watch(parent: int, tree: ClusterTree) -> None:
    """Record ``tree`` every ``WATCH_S`` until ``parent`` has ended or closed our stdin."""
    try:
        fd: int | None = os.pidfd_open(parent)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        fd = None
    watched = [sys.stdin] + ([fd] if fd is not None else [])
    while os.getppid() == parent:  # else it ended before the pidfd was open (its pid may be reused)
        tree.update()
        ready, _, _ = select.select(watched, [], [], WATCH_S)
        if fd in ready:
            return
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 4096):
            return


def main(argv: list[str]) -> None:
    parent, token = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the starter's Ctrl-C is the starter's
    tree = ClusterTree(ENV, token, exclude=os.getpid())
    _watch(parent, tree)
    tree.kill()


if __name__ == "__main__":
    main(sys.argv[1:])
