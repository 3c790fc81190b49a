"""``ragserve serve`` as a child process on loopback: for tests, benchmarks and soak runs.

**Usage:**

    with ServerProcess("indexes/docs", env={"RAGSERVE_CACHE_ENABLED": "false"}) as srv:
        httpx.post(f"{srv.url}/v1/query", json={"question": "..."})
    srv.returncode   # 0 after a clean SIGTERM drain
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ragserve.generators.lifeline import process_table


def wait_until_ready(proc: subprocess.Popen[bytes], ready: Path, timeout_s: float, poll_s: float = 0.1) -> str | None:
    """The loopback URL of a server started with ``--ready-file ready`` (it writes its port
    there once it accepts requests), or None if ``proc`` exits or ``timeout_s`` passes
    first: then the caller decides what to kill and what to report."""
    deadline = time.monotonic() + timeout_s
    while not (ready.is_file() and (port := ready.read_text().strip())):
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(poll_s)
    return f"http://127.0.0.1:{port}"


class ServerProcess:
    def __init__(self, index: str | Path, *, env: dict[str, str] | None = None, args: list[str] | None = None,
                 log: Path | None = None, start_timeout_s: float = 300.0) -> None:
        """``env``: added to this process's environment (``RAGSERVE_*`` settings); ``args``:
        extra ``ragserve serve`` options; ``log``: where its output goes (default: a temp file)."""
        self.index = Path(index)
        self.env = env or {}
        self.args = args or []
        self.log = log
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.returncode: int | None = None

    def start(self) -> ServerProcess:
        workdir = Path(tempfile.mkdtemp(prefix="ragserve-serve-"))
        ready = workdir / "port"
        self.log = self.log or workdir / "server.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.env}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ragserve.cli", "serve", str(self.index), "--port", "0",
                 "--ready-file", str(ready), *self.args], env=env, stdout=out, stderr=subprocess.STDOUT,
                # Its own process group: kill() takes the vLLM engine core with it (a SIGKILLed
                # server cannot stop its engine, which would live on as an orphan).
                start_new_session=True)
        url = wait_until_ready(self.proc, ready, self.start_timeout_s)
        if url is None:
            self.kill()
            raise RuntimeError(f"ragserve serve did not start; its log:\n{self.tail()}")
        self.url = url
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 120.0) -> int | None:
        """SIGTERM (the drain), then wait; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return self.returncode
        self.signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the server and every process it started (its process group)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the server and its children are all gone already
        self.proc.wait()
        self.returncode = self.proc.returncode

    def group_alive(self) -> bool:
        """Whether any process the server started is still running (its engine core, say)."""
        return self.proc is not None and bool(group_members(self.proc.pid))

    def tail(self, n: int = 3000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace") if self.log and self.log.exists() else ""

    def __enter__(self) -> ServerProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (zombies do not count)."""
    return [pid for pid, proc in process_table().items() if proc.pgrp == pgid]
