"""A real uvicorn server on a free loopback port, in a thread of the test process; and
``get``/``post``, httpx's with a deadline a loaded machine meets."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from ragserve.cache.redis_server import free_port
from ragserve.config import ServerConfig
from ragserve.testing.waits import CLUSTER_WAIT_S, HTTP_TIMEOUT_S, WAIT_S, eventually


def get(url: str, **kwargs: Any) -> httpx.Response:
    """``httpx.get`` with ``timeout=HTTP_TIMEOUT_S`` unless one is given: httpx's default of
    5 s is no deadline for a loaded machine."""
    return httpx.get(url, **{"timeout": HTTP_TIMEOUT_S, **kwargs})


def post(url: str, **kwargs: Any) -> httpx.Response:
    """``httpx.post`` with ``timeout=HTTP_TIMEOUT_S`` unless one is given."""
    return httpx.post(url, **{"timeout": HTTP_TIMEOUT_S, **kwargs})


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    """A raw TCP connection to 127.0.0.1:``port`` (``rcvbuf``: its receive buffer, to make
    a client that reads slowly), for tests that send bytes no HTTP client would."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(HTTP_TIMEOUT_S)
    s.connect(("127.0.0.1", port))
    return s


@contextmanager
def running(app, *, timeout_s: float = WAIT_S, stop_timeout_s: float = CLUSTER_WAIT_S,
            server: Callable[[uvicorn.Config], uvicorn.Server] = uvicorn.Server,
            limits: ServerConfig | None = None) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its base URL (http://127.0.0.1:PORT).
    ``server`` makes the uvicorn ``Server`` from its ``Config`` (``ragserve serve``'s own
    ``DrainingServer``, say). The server must have started within ``timeout_s`` and have
    stopped within ``stop_timeout_s`` of the block's end (its 2 s grace included).
    ``limits``: the connection bounds (``ragserve.server.limits``) of ``ragserve serve``,
    its defaults unless given."""
    from ragserve.server.limits import uvicorn_options

    port = free_port()
    server = server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                   access_log=False, timeout_graceful_shutdown=2,
                                   **uvicorn_options(limits or ServerConfig(), app)))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    eventually(lambda: server.started or not thread.is_alive(), timeout_s, 0.01, "the test server to start")
    if not server.started:
        raise RuntimeError("the test server did not start (its thread ended)")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=stop_timeout_s)
    if thread.is_alive():
        raise RuntimeError("the test server did not stop")
