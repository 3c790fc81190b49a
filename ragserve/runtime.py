"""The engine's own event loop, on a background thread.

vLLM's ``AsyncLLM`` belongs to the loop it was started on. ragserve runs that loop on a
dedicated thread, so the same engine serves ``query()`` from plain scripts and threads,
and ``await aquery()`` from any other event loop (a web server, a notebook): work is
submitted to the engine loop and awaited from the caller's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
A = TypeVar("A")


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
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C in the caller: the work on the engine loop stops too
            raise

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await a coroutine that runs on the engine loop, from any event loop.

        Cancelling the caller's task cancels the coroutine on the engine loop too.
        """
        if self.in_loop():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        """Consume an async iterator that runs on the engine loop, from a plain thread.

        Closing the returned iterator early (``break``, an exception in the consumer)
        cancels the producer on the engine loop; for a generation that aborts the
        vLLM request.
        """
        if self.in_loop():
            raise RuntimeError("blocking iteration on the engine loop itself; use the async API")
        items: queue.Queue[tuple[str, Any]] = queue.Queue()
        future = self.submit(_pump(stream, items.put))
        try:
            while (item := _unwrap(items.get())) is not _END:
                yield item
        finally:
            future.cancel()

    async def aiterate(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """The same from any event loop: items hop from the engine loop to the caller's."""
        if self.in_loop():
            async for item in stream:
                yield item
            return
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        future = self.submit(_pump(stream, lambda item: loop.call_soon_threadsafe(items.put_nowait, item)))
        try:
            while (item := _unwrap(await items.get())) is not _END:
                yield item
        finally:
            future.cancel()

    def cancel_tasks(self, keep: Callable[[asyncio.Task[Any]], bool] = lambda t: False,
                     timeout_s: float = 10.0) -> int:
        """Cancel the engine loop's tasks (but those ``keep`` names) and wait for them to
        unwind; returns how many were cancelled. Requests cancelled this way abort their
        vLLM request instead of being dropped half-way when the loop stops."""
        if not self.running:
            return 0

        async def cancel() -> int:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done() and not keep(t)]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout_s)
            return len(tasks)

        return self.run(cancel())

    def stop(self) -> None:
        if not self.running:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.loop.close()


async def map_bounded(fn: Callable[[A], Awaitable[T]], items: Iterable[A], limit: int,
                      on_done: Callable[[], Any] | None = None) -> list[T | Exception]:
    """``fn`` over ``items`` with at most ``limit`` running at once, results in input order.

    The next item starts as soon as any finishes (no waiting for the slowest of a group),
    so a generation engine keeps its batch full. A failed item's ``Exception`` is kept in
    its slot; cancellation and interrupts are not per-item failures and are re-raised.
    """
    gate = asyncio.Semaphore(max(1, limit))

    async def one(item: A) -> T | Exception:
        async with gate:
            try:
                return await fn(item)
            except Exception as e:  # noqa: BLE001 - reported in its slot
                return e
            finally:
                if on_done is not None:
                    on_done()

    results = await asyncio.gather(*(one(x) for x in items), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r
    return results  # type: ignore[return-value]


_END = object()


def _unwrap(message: tuple[str, Any]) -> Any:
    """A message from ``_pump``: its item, ``_END``, or its error raised here."""
    kind, value = message
    if kind == "error":
        raise value
    return _END if kind == "end" else value


async def _pump(stream: AsyncIterator[Any], put: Callable[[tuple[str, Any]], Any]) -> None:
    try:
        async for item in stream:
            put(("item", item))
    except asyncio.CancelledError:
        raise  # the consumer went away; nobody reads the queue any more
    except Exception as e:  # noqa: BLE001 - handed to the consumer, who re-raises it
        put(("error", e))
    else:
        put(("end", None))
