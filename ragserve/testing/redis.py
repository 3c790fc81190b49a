"""A real Redis server for a test, on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ragserve.cache.redis_server import RedisServer, free_port
from ragserve.testing.waits import WAIT_S


@contextmanager
def redis_server(**options: Any) -> Iterator[RedisServer]:
    """``RedisServer(port=free_port(), **options)``, started within ``WAIT_S`` (a loaded
    machine's deadline, not ``start()``'s own 10 s) and stopped when the block ends."""
    server = RedisServer(**{"port": free_port(), **options}).start(timeout_s=WAIT_S)
    try:
        yield server
    finally:
        server.stop()
