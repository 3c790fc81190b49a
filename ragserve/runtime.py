"""The engine's own event loop, on a background thread.

vLLM's ``AsyncLLM`` belongs to the loop it was started on. ragserve runs that loop on a
dedicated thread, so the same engine serves ``query()`` from plain scripts and threads,
and ``await aquery()`` from any other event loop (a web server, a notebook): work is
submitted to the engine loop and awaited from the caller's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "ragserve-engine") -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the engine loop and wait for it (from another thread)."""
        if self.in_loop():
            coro.close()
            raise RuntimeError("blocking call from the engine loop itself; use the async API")
        return self.submit(coro).result()

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await a coroutine that runs on the engine loop, from any event loop.

        Cancelling the caller's task cancels the coroutine on the engine loop too.
        """
        if self.in_loop():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self) -> None:
        if not self.running:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.loop.close()
