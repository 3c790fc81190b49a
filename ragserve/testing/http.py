"""A real uvicorn server on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn

from ragserve.cache.redis_server import free_port


@contextmanager
def running(app, *, timeout_s: float = 30.0,
            server: Callable[[uvicorn.Config], uvicorn.Server] = uvicorn.Server) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its base URL (http://127.0.0.1:PORT).
    ``server`` makes the uvicorn ``Server`` from its ``Config`` (``ragserve serve``'s own
    ``DrainingServer``, say). The server must have stopped when the block ends."""
    port = free_port()
    server = server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                   access_log=False, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    if thread.is_alive():
        raise RuntimeError("the test server did not stop")
