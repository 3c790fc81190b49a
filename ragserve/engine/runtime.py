"""The engine's own event loop, on a background thread.

vLLM's ``AsyncLLM`` belongs to the loop it was started on. ragserve runs that loop on a
dedicated thread, so the same engine serves ``query()`` from plain scripts and threads,
and ``await aquery()`` from any other event loop (a web server, a notebook): work is
submitted to the engine loop and awaited from the caller's loop.

Streams come back through a ``Relay``: the items of every stream bound for one caller's
loop share that loop's ``_Mailbox``, so a turn of the engine loop that gives a token to
each of 32 streams wakes the caller's loop once, not 32 times.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from functools import partial
from typing import Any, Generic, TypeVar

T = TypeVar("T")
A = TypeVar("A")


class LoopThread:
    def __init__(self, name: str = "ragserve-engine") -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
        self._mailbox_lock = threading.Lock()
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

    def aiterate(self, stream: AsyncIterator[T]) -> Relay[T]:
        """The same from any event loop: items hop from the engine loop to the caller's
        (``Relay``: also in lists of those that arrived together, ``batches()``)."""
        return Relay(self, stream)

    def mailbox(self, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        """The one mailbox of ``loop``: what every stream read from that loop arrives by."""
        with self._mailbox_lock:
            box = self._mailboxes.get(loop)
            if box is None:
                box = self._mailboxes[loop] = _Mailbox(loop)
            return box

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


class _Mailbox:
    """Messages from the engine loop to one other loop, with one wake-up of that loop per
    batch: the first message posted schedules a delivery, the ones posted before it runs
    ride along. Nothing ever waits to be batched; it only happens when the reader's loop
    has not run since the last message."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # NOTE: weak, as the mailboxes' keys are: a strong reference here would keep every
        # caller loop (each ``asyncio.run`` that streamed) alive, and its mailbox, for good.
        self._loop = weakref.ref(loop)
        self._pending: deque[tuple[weakref.ref[Relay[Any]], tuple[str, Any]]] = deque()
        self._scheduled = False

    def post(self, relay: weakref.ref[Relay[Any]], message: tuple[str, Any]) -> None:
        """On the engine loop's thread. A weak reference: a relay its reader dropped is
        collected, and that cancels its producer (``Relay.__del__``)."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            return  # its reader's loop is gone: nobody is left to read it
        self._pending.append((relay, message))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        # NOTE: cleared BEFORE draining: a message posted while the flag still read True
        # is in the deque by then, and one posted after it schedules a delivery of its own.
        self._scheduled = False
        pending = self._pending
        while pending:
            ref, message = pending.popleft()
            relay = ref()
            if relay is not None:
                relay.deliver(message)


class Relay(Generic[T]):
    """An async iterator, on the caller's loop, over a stream that runs on the engine loop.

    ``batches()`` reads the same items in lists of all those that had arrived when the
    reader looked, never waiting for more: a writer that fell behind sends several tokens
    at once, a writer that keeps up sends each as it comes. The producer starts at the
    first read; ``aclose()`` (or dropping the relay) cancels it, which aborts a generation.
    """

    def __init__(self, runtime: LoopThread, stream: AsyncIterator[T]) -> None:
        self._runtime = runtime
        self._stream: AsyncIterator[T] | None = stream
        self._direct: AsyncIterator[T] | None = None  # read on the engine loop itself: no hop
        self._future: concurrent.futures.Future[None] | None = None
        self._messages: deque[tuple[str, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False

    def __aiter__(self) -> Relay[T]:
        return self

    async def __anext__(self) -> T:
        if self._direct is not None or (self._stream is not None and self._start()):
            return await self._direct.__anext__()  # type: ignore[union-attr]
        await self._arrival()
        item = self._take()
        if item is _END:
            raise StopAsyncIteration
        return item  # type: ignore[no-any-return]

    async def batches(self) -> AsyncIterator[list[T]]:
        """Lists of the items that arrived together (each list holds at least one)."""
        if self._direct is not None or (self._stream is not None and self._start()):
            async for item in self._direct:  # type: ignore[union-attr]
                yield [item]
            return
        while True:
            await self._arrival()
            batch: list[T] = []
            while self._messages:
                item = self._take() if self._messages[0][0] == "item" or not batch else _END
                if item is _END:
                    break
                batch.append(item)
            if batch:
                yield batch
            if self._done and not self._messages:
                return

    def deliver(self, message: tuple[str, Any]) -> None:
        """From the mailbox, on the reader's loop."""
        self._messages.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _start(self) -> bool:
        """Start the producer (at the first read); True when read on the engine loop itself."""
        stream, self._stream = self._stream, None
        if self._runtime.in_loop():
            self._direct = stream
            return True
        box = self._runtime.mailbox(asyncio.get_running_loop())
        self._future = self._runtime.submit(_pump(stream, partial(box.post, weakref.ref(self))))  # type: ignore[arg-type]
        return False

    async def _arrival(self) -> None:
        """Until at least one message is here (an end, after the end)."""
        if self._done and not self._messages:
            self._messages.append(("end", None))
        while not self._messages:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _take(self) -> Any:
        """The next item, or ``_END``; a producer's error is raised here."""
        kind, value = self._messages.popleft()
        if kind != "item":
            self._done = True
        return _unwrap((kind, value))

    async def aclose(self) -> None:
        self._done = True
        self._stream = None
        if self._future is not None:
            self._future.cancel()
        elif self._direct is not None:
            await self._direct.aclose()  # type: ignore[attr-defined]

    def __del__(self) -> None:
        future = getattr(self, "_future", None)
        if future is not None and not future.done():
            try:
                future.cancel()  # a reader that dropped the relay: the generation stops
            except RuntimeError:  # the engine loop is already closed
                pass


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
