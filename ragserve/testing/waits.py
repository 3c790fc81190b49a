"""Waiting in tests for what another thread, process, server or cluster does.

The rule: never sleep a fixed time and assume the thing has happened by then. Poll the
condition itself, with a deadline that a busy 2-core machine (the engine suite running
beside the tests) does not reach in practice. A poll returns as soon as the condition
holds, so a generous deadline costs nothing when the machine is fast; it only decides how
long a real failure takes to be reported.

**Usage:**

    eventually(lambda: ray.available_resources().get("CPU", 0) >= 2, CLUSTER_WAIT_S,
               what="the build's actors to free their CPUs")
    await aeventually(lambda: gen.running == 0, what="the aborted generation to end")
    httpx.post(url, json=body, timeout=HTTP_TIMEOUT_S)
    assert at_once(tier.get(key)) is None  # answered without waiting for anything

``at_once`` is the other side: "refused at once", "never waits for the probe", asserted as
"finished without suspending", not as a duration a loaded machine may exceed.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

WAIT_S = 30.0
"""What a loaded machine does promptly: another thread's, event loop's or loopback server's
reaction, an abort reaching an engine, a process or server starting or exiting, Ray's view
of its resources."""
CLUSTER_WAIT_S = 60.0
"""What a cluster does in its own time: Ray Serve replacing or probing a replica, replicas
following an index, Ray's metrics export, resources released after actors stop."""
HTTP_TIMEOUT_S = 60.0
"""A test's request to a server that is up (httpx's default of 5 s is no deadline for a
loaded machine)."""


def eventually(condition: Callable[[], T], timeout_s: float = WAIT_S, interval_s: float = 0.02,
               what: str = "", *, ignore: tuple[type[BaseException], ...] = ()) -> T:
    """``condition()``'s first truthy value, polled every ``interval_s`` (at once first).
    Past ``timeout_s`` an AssertionError says what was awaited (``what``) and the last value.
    ``ignore``: exceptions of ``condition`` that mean "not yet" (a server still starting);
    with ``(AssertionError,)`` the condition can be a function that asserts and returns what
    it checked, and its last failed assert is the message."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = _check(condition, ignore)
        if not isinstance(last, BaseException) and last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(condition, timeout_s, what, last))
        time.sleep(interval_s)


async def aeventually(condition: Callable[[], Any], timeout_s: float = WAIT_S, interval_s: float = 0.02,
                      what: str = "", *, ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """``eventually`` on a running event loop: it awaits between polls, so the loop's other
    tasks (often what the condition waits for) keep running. ``condition`` may also return
    an awaitable (a coroutine function, a Redis call): its result is what counts."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = _check(condition, ignore)
        if inspect.isawaitable(last):
            try:
                last = await last
            except ignore as e:
                last = e
        if not isinstance(last, BaseException) and last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(condition, timeout_s, what, last))
        await asyncio.sleep(interval_s)


def _check(condition: Callable[[], T], ignore: tuple[type[BaseException], ...]) -> T | BaseException:
    try:
        return condition()
    except ignore as e:
        return e


def _timed_out(condition: Callable[[], object], timeout_s: float, what: str, last: object) -> str:
    name = what or getattr(condition, "__qualname__", repr(condition))
    return f"waited {timeout_s:g} s for {name}; last: {last!r}"


def at_once(coroutine: Coroutine[Any, Any, T]) -> T:
    """``coroutine``'s result (or its exception), asserting that it finished without ever
    suspending: it waited for nothing (no lock, no queue, no timer, no I/O). Call it from
    the event loop the coroutine belongs to (an async test)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise AssertionError(f"{coroutine.__qualname__} suspended: it waited instead of finishing at once")
