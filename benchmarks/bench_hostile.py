"""Hostile HTTP traffic against a real ``ragserve serve`` process (issue 28): what new clients
get while thousands of connections sit idle, trickle headers, or never read their stream.

The server is ``scripts/fake_serve.py`` (``serve_index`` with its real HTTP stack, over
stand-in models: no vLLM) with the ``[server]`` limits at their defaults
(``ragserve/server/limits.py``). Phases, one after the other:

1. ``quiet``: probes alone. A probe is a NEW client: it connects, sends one request
   (``GET /health`` or ``POST /v1/retrieve``) and reads the answer, with a deadline of
   ``--probe-timeout`` seconds.
2. ``idle``: ``--idle`` connections opened as fast as the machine allows, half with a
   partial request line (``GET /hea``), half silent, held for ``--hold`` seconds, with
   probes all along.
3. ``slow``: ``--tricklers`` connections sending header bytes at 1 byte/s, plus ``--sse``
   clients that start a streamed query (a long answer: ``--tokens``) with a 4 KiB receive
   buffer and never read, for ``--hold`` seconds, with probes all along.

Reported per phase: probes served (200) / refused (an HTTP refusal or the connection
closed) / timed out, their p50/p99 latency; what the server did to the attackers'
connections (closed by it, and when); the server's RSS and open descriptors (peak); and,
after each phase, the seconds until the server holds no client connection.

And the parsers side by side (``--parsers``), in this process on a trivial app: uvicorn's
stock httptools, stock h11, and ragserve's ``LimitedProtocol``: requests/s over 4
keep-alive connections, and what each does with 100,000 headers (4.2 MB) on one request.

Run (the client needs a descriptor per connection: it raises its own limit to the hard
one, and uses what fits if that is less than ``--idle``):

    python benchmarks/bench_hostile.py --index indexes/xquad
    python benchmarks/bench_hostile.py --index indexes/xquad --idle 2000 --tricklers 50 --sse 10 --hold 15

A benchmark, not a test: it asserts nothing but that the server started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import harness
from harness import fmt, pct

log = harness.logger("hostile")


def parse_args() -> argparse.Namespace:
    ap = harness.parser(__doc__, raw=False)
    ap.add_argument("--index", type=Path, default=harness.XQUAD_INDEX)
    ap.add_argument("--idle", type=int, default=20_000)
    ap.add_argument("--tricklers", type=int, default=200)
    ap.add_argument("--sse", type=int, default=50)
    ap.add_argument("--hold", type=float, default=60.0, help="seconds each attack lasts")
    ap.add_argument("--tokens", type=int, default=12000, help="pieces per streamed answer (SSE phase)")
    ap.add_argument("--step-ms", type=float, default=5.0, help="one piece per stream every step")
    ap.add_argument("--probe-every", type=float, default=0.25, help="seconds between probes of each kind")
    ap.add_argument("--probe-timeout", type=float, default=10.0)
    ap.add_argument("--parsers", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", type=Path, default=harness.REPO / "reports" / "bench_hostile.md")
    return ap.parse_args()


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# -- probes: new clients -----------------------------------------------------------------------

HEALTH = b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
_BODY = b'{"question": "When was the university founded?", "top_k": 3}'
RETRIEVE = (b"POST /v1/retrieve HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY))


async def probe(port: int, request: bytes, timeout_s: float) -> tuple[str, float]:
    """("200" | "refused <status>" | "closed" | "timeout" | "error", seconds)."""
    t = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)
                head = await reader.readline()
                await reader.read()  # to the end: Connection: close
            finally:
                writer.close()
    except TimeoutError:
        return "timeout", time.perf_counter() - t
    except (ConnectionError, OSError):
        return "closed", time.perf_counter() - t
    seconds = time.perf_counter() - t
    if not head:
        return "closed", seconds
    status = head.split(b" ", 2)[1].decode()
    return ("200" if status == "200" else f"refused {status}"), seconds


class Prober:
    """/health and /v1/retrieve probes every ``every`` seconds until stopped."""

    def __init__(self, port: int, every: float, timeout_s: float) -> None:
        self.port, self.every, self.timeout_s = port, every, timeout_s
        self.results: dict[str, list[tuple[str, float]]] = {"health": [], "retrieve": []}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            for name, req in (("health", HEALTH), ("retrieve", RETRIEVE)):
                task = asyncio.ensure_future(self._one(name, req))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every)

    async def _one(self, name: str, req: bytes) -> None:
        self.results[name].append(await probe(self.port, req, self.timeout_s))

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)


def probe_row(phase: str, name: str, results: list[tuple[str, float]]) -> str:
    ok = [s for r, s in results if r == "200"]
    refused = sum(1 for r, _ in results if r.startswith("refused") or r == "closed")
    timeouts = sum(1 for r, _ in results if r == "timeout")
    p50, p99 = (pct(ok, 50) * 1e3, pct(ok, 99) * 1e3) if ok else (None, None)
    return (f"| {phase} | {name} | {len(results)} | {len(ok)} | {refused} | {timeouts} | "
            f"{fmt(p50, '.1f')} | {fmt(p99, '.1f')} |")


# -- the server's side ----------------------------------------------------------------------------


class ServerWatch:
    """Peak RSS and open descriptors of the server process, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.peak_rss = self.peak_fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def sample(self) -> tuple[int, int]:
        rss, fds = self.proc.memory_info().rss, self.proc.num_fds()
        self.peak_rss, self.peak_fds = max(self.peak_rss, rss), max(self.peak_fds, fds)
        return rss, fds

    def reset(self) -> None:
        self.peak_rss = self.peak_fds = 0

    def clients(self, port: int) -> int:
        """Connections of the server's port to a client (any state but LISTEN)."""
        return sum(1 for c in self.proc.net_connections("tcp") if c.laddr and c.laddr.port == port
                   and c.status != "LISTEN")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def settle(watch: ServerWatch, port: int, timeout_s: float = 120.0) -> float | None:
    """Seconds until the server holds no client connection; None past ``timeout_s``."""
    t = time.perf_counter()
    while time.perf_counter() - t < timeout_s:
        if await asyncio.to_thread(watch.clients, port) == 0:
            return time.perf_counter() - t
        await asyncio.sleep(0.5)
    return None


# -- attackers ----------------------------------------------------------------------------------


class Attack:
    """Sockets this process opened; when the server closed each (seconds after open)."""

    def __init__(self) -> None:
        self.opened = 0
        self.failed = 0
        self.closed_by_server: list[float] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.first_error = ""

    async def watch(self, reader: asyncio.StreamReader, t0: float) -> None:
        """Read (and drop) until the server closes the connection; a cancel is ours."""
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(65536):
                pass
        self.closed_by_server.append(time.perf_counter() - t0)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for w in self.writers:
            with contextlib.suppress(Exception):
                w.transport.abort()


async def open_idle(port: int, n: int, attack: Attack, batch: int = 256) -> float:
    t = time.perf_counter()

    async def one(i: int) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            attack.failed += 1
            attack.first_error = attack.first_error or f"{type(e).__name__}: {e}"
            return
        attack.opened += 1
        if i % 2:
            writer.write(b"GET /hea")
        attack.writers.append(writer)
        attack.tasks.append(asyncio.ensure_future(attack.watch(reader, time.perf_counter())))

    for start in range(0, n, batch):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + batch))))
    return time.perf_counter() - t


async def trickler(port: int, attack: Attack, until: float) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        attack.failed += 1
        return
    attack.opened += 1
    attack.writers.append(writer)
    t0 = time.perf_counter()
    watcher = asyncio.ensure_future(attack.watch(reader, t0))
    attack.tasks.append(watcher)
    head = b"GET /health HTTP/1.1\r\nHost: bench\r\nX-Slow: " + b"a" * 10_000
    for byte in head:
        if watcher.done() or time.monotonic() > until:
            return
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(bytes([byte]))
        await asyncio.sleep(1.0)


def sse_reader_never(port: int, attack: Attack, tokens_body: bytes) -> socket.socket | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(tokens_body), tokens_body))
    except OSError:
        attack.failed += 1
        s.close()
        return None
    attack.opened += 1
    return s


def sse_closed(socks: list[socket.socket]) -> int:
    """Streams the server ended: an RST or FIN is visible without reading the data first
    (MSG_PEEK only sees data), so ask the kernel for the socket's TCP state."""
    closed = 0
    for s in socks:
        state = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        if state not in (1,):  # 1 = TCP_ESTABLISHED
            closed += 1
    return closed


# -- phases -----------------------------------------------------------------------------------


async def run_phase(name: str, port: int, args: argparse.Namespace, watch: ServerWatch,
                    attack_fn: Any) -> dict[str, Any]:
    log(f"phase {name}")
    watch.reset()
    prober = Prober(port, args.probe_every, args.probe_timeout)
    probing = asyncio.ensure_future(prober.run())
    t0 = time.perf_counter()
    detail = await attack_fn()
    await prober.stop()
    await probing
    rss, _ = watch.sample()
    out = {"phase": name, "probes": prober.results, "detail": detail, "seconds": time.perf_counter() - t0,
           "peak_rss_mb": watch.peak_rss / 2**20, "peak_fds": watch.peak_fds, "end_rss_mb": rss / 2**20}
    out["settle_s"] = await settle(watch, port)
    log(f"phase {name} done: {detail}")
    return out


async def main_async(args: argparse.Namespace, port: int, watch: ServerWatch) -> list[dict[str, Any]]:
    phases = []

    async def quiet() -> dict[str, Any]:
        await asyncio.sleep(min(args.hold, 15.0))
        return {}

    phases.append(await run_phase("quiet", port, args, watch, quiet))

    async def idle() -> dict[str, Any]:
        attack = Attack()
        opened_s = await open_idle(port, args.idle, attack)
        log(f"opened {attack.opened} idle connections in {opened_s:.1f} s ({attack.failed} failed)")
        await asyncio.sleep(args.hold)
        closed = sorted(attack.closed_by_server)
        detail = {"asked": args.idle, "opened": attack.opened, "failed": attack.failed, "open_s": opened_s,
                  "closed_by_server": len(closed), "closed_p50_s": pct(closed, 50) if closed else None,
                  "first_error": attack.first_error}
        attack.close()
        return detail

    phases.append(await run_phase("idle", port, args, watch, idle))

    async def slow() -> dict[str, Any]:
        attack, streams = Attack(), Attack()
        until = time.monotonic() + args.hold
        tasks = [asyncio.ensure_future(trickler(port, attack, until)) for _ in range(args.tricklers)]
        body = b'{"question": "Tell me everything about the university.", "stream": true}'
        socks = [s for s in await asyncio.gather(*(asyncio.to_thread(sse_reader_never, port, streams, body)
                                                    for _ in range(args.sse))) if s is not None]
        t0, ended_at = time.perf_counter(), {}
        while time.monotonic() < until:  # when each stream was ended by the server
            for s in socks:
                if s not in ended_at and sse_closed([s]):
                    ended_at[s] = time.perf_counter() - t0
            await asyncio.sleep(0.5)
        ended = sorted(ended_at.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        closed = sorted(attack.closed_by_server)
        detail = {"tricklers": attack.opened, "trickle_closed_by_server": len(closed),
                  "trickle_closed_p50_s": pct(closed, 50) if closed else None,
                  "trickle_closed_max_s": closed[-1] if closed else None,
                  "sse_clients": len(socks), "sse_ended_by_server": len(ended),
                  "sse_ended_p50_s": pct(ended, 50) if ended else None, "sse_ended_max_s": ended[-1] if ended else None}
        attack.close()
        for s in socks:
            s.close()
        return detail

    phases.append(await run_phase("slow", port, args, watch, slow))
    return phases


# -- parsers side by side (in this process) ----------------------------------------------------------


def parsers_table() -> list[str]:
    import uvicorn

    from ragserve.cache.redis_server import free_port
    from ragserve.config import ServerConfig
    from ragserve.server.limits import limited_protocol

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    rows = ["| parser | requests/s (4 keep-alive connections, 3 s) | 100,000 headers (4.2 MB) on one request |",
            "|---|---|---|"]
    for name, http in (("httptools (uvicorn's default)", "httptools"), ("h11", "h11"),
                       ("LimitedProtocol (ragserve)", limited_protocol(ServerConfig()))):
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=http, log_level="critical",
                                               access_log=False, lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        try:
            rate = keepalive_rate(port, 4, 3.0)
            verdict = many_headers(port)
        finally:
            server.should_exit = True
            thread.join(30)
        rows.append(f"| {name} | {rate:,.0f} | {verdict} |")
    return rows


def keepalive_rate(port: int, conns: int, seconds: float) -> float:
    req = b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n"
    count = [0] * conns

    def loop(i: int) -> None:
        s = socket.create_connection(("127.0.0.1", port))
        f = s.makefile("rb")
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            s.sendall(req)
            while f.readline() not in (b"\r\n", b""):
                pass
            f.read(2)
            count[i] += 1
        s.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(count) / seconds


def many_headers(port: int) -> str:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(100_000))
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(60)
    t = time.perf_counter()
    with contextlib.suppress(OSError):
        s.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\n" + headers + b"\r\n")
    try:
        head = s.recv(64)
    except OSError as e:
        head = f"{type(e).__name__}".encode()
    s.close()
    status = head.split(b"\r\n")[0].decode(errors="replace") or "(closed)"
    return f"{status} in {(time.perf_counter() - t) * 1e3:.0f} ms"


# -- report ---------------------------------------------------------------------------------------


def report(args: argparse.Namespace, env: dict[str, Any], nofile: int, phases: list[dict[str, Any]],
           parsers: list[str]) -> str:
    lines = ["# Hostile HTTP traffic against `ragserve serve` (fake_serve.py, default [server] limits)", "",
             *harness.run_lines(env), f"- client descriptor limit: {nofile}", "",
             "## New clients (probes) per phase", "",
             "| phase | probe | sent | served 200 | refused | timed out | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for ph in phases:
        for name, results in ph["probes"].items():
            lines.append(probe_row(ph["phase"], name, results))
    lines += ["", "## The server", "",
              "| phase | peak RSS MB | RSS at end MB | peak open fds | s until no client connection is left |",
              "|---|---|---|---|---|"]
    for ph in phases:
        lines.append(f"| {ph['phase']} | {ph['peak_rss_mb']:.0f} | {ph['end_rss_mb']:.0f} | {ph['peak_fds']} | "
                     f"{fmt(ph['settle_s'], '.1f')} |")
    lines += ["", "## The attackers' connections", ""]
    for ph in phases[1:]:
        lines.append(f"- {ph['phase']}: " + ", ".join(f"{k} {fmt(v, '.1f') if isinstance(v, float) else v}"
                                                      for k, v in ph["detail"].items() if v not in ("", None)))
    if parsers:
        lines += ["", "## Parsers side by side (in-process, trivial app)", "", *parsers]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    env = harness.environment(gpu=False)
    nofile = raise_nofile()
    if nofile < args.idle + 512:
        fit = max(100, nofile - 512)
        log(f"this process may open {nofile} descriptors: {fit} idle connections instead of {args.idle}")
        args.idle = fit
    parsers = parsers_table() if args.parsers else []
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp_:
        tmp = Path(tmp_)
        ready = tmp / "port"
        senv = {**os.environ, "RAGSERVE_HOME": str(tmp / "home"), "RAGSERVE_CACHE_ENABLED": "false",
                "PYTHONPATH": str(harness.REPO)}
        argv = [sys.executable, str(harness.SCRIPTS / "fake_serve.py"), str(args.index), "--ready-file", str(ready),
                "--tokens", str(args.tokens), "--step-ms", str(args.step_ms), "--grace", "5"]
        proc, url = harness.launch(argv, env=senv, log=tmp / "server.log", ready=ready, timeout_s=120,
                                   what="fake_serve")
        port = int(url.rsplit(":", 1)[1])
        try:
            with ServerWatch(proc.pid) as watch:
                phases = asyncio.run(main_async(args, port, watch))
        finally:
            code, secs = harness.stop(proc, 60)
            log(f"server stopped: exit {code} in {secs:.1f} s")
            log_tail = harness.tail(tmp / "server.log", 15)
    text = report(args, env, nofile, phases, parsers)
    text += f"\nserver log (last lines):\n\n```\n{log_tail}\n```\n"
    harness.write_report(text, md=args.out, json_path=args.out.with_suffix(".json"), data=phases)


if __name__ == "__main__":
    main()
