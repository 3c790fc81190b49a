"""W3C trace context without OpenTelemetry: parse and format ``traceparent``, and the
trace context each request in flight is running under, by request id.

The server's edge binds a request's context here (``bind``) for as long as the request
runs; whatever works for that request later, on another thread or event loop, finds it by
the request id it already carries: the ``openai`` backend sends it on to remote servers
(``traceparent_for``), the Ray client passes it over the handle call, the Prometheus
exporter puts its trace id on exemplars. Nothing here imports OpenTelemetry: with tracing
off, nothing is ever bound and each look-up is one dict ``get`` on an empty dict.

**Usage:**

    ctx = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    token = bind("req-1", ctx)
    traceparent_for("req-1")       # "00-4bf9...-00f067aa0ba902b7-01"
    unbind("req-1", token)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


@dataclass(frozen=True)
class TraceParent:
    """One W3C trace context: the trace, the span that is the parent, and the sampled flag."""

    trace_id: str
    span_id: str
    sampled: bool

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str | None) -> TraceParent | None:
    """A ``traceparent`` header as the W3C spec reads it, or None when it is absent or not
    valid (version ff, all-zero ids, bad hex): the request then starts a new trace."""
    if not value:
        return None
    m = _TRACEPARENT.fullmatch(value.strip().lower())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceParent(trace_id, span_id, bool(int(flags, 16) & 1))


_bound: dict[str, TraceParent] = {}


def bind(request_id: str, context: TraceParent) -> tuple[TraceParent, TraceParent | None]:
    """Run ``request_id`` under ``context`` until ``unbind``; returns the token to unbind
    with. Bindings nest: a span of this process inside the request (a Ray replica's) binds
    its own context and ``unbind`` puts the outer one back."""
    previous = _bound.get(request_id)
    _bound[request_id] = context
    return context, previous


def unbind(request_id: str, token: tuple[TraceParent, TraceParent | None]) -> None:
    """Undo ``bind``, unless a later request with the same id bound its own since."""
    context, previous = token
    if _bound.get(request_id) is not context:
        return
    if previous is None:
        del _bound[request_id]
    else:
        _bound[request_id] = previous


def context_for(request_id: str) -> TraceParent | None:
    return _bound.get(request_id)


def traceparent_for(request_id: str) -> str | None:
    """The ``traceparent`` header to send on for ``request_id``'s work, or None."""
    context = _bound.get(request_id)
    return None if context is None else context.header()


def sampled_trace_id(request_id: str) -> str | None:
    """The trace id of ``request_id`` if its trace is recorded (for an exemplar), else None."""
    context = _bound.get(request_id)
    return context.trace_id if context is not None and context.sampled else None


@contextmanager
def continued(request_id: str, traceparent: str | None, tracing: Any = None,
              name: str = "ragserve.generator") -> Iterator[None]:
    """Run ``request_id``'s work in this process under the ``traceparent`` its caller sent
    (the Ray generator replica: the ingress sent it over the handle call). With a
    ``tracing`` (``traces.Tracing``), the work is a span of its own, the child of the
    caller's; without, the caller's context is only passed on (to a remote server)."""
    parent = parse_traceparent(traceparent)
    if parent is None:
        yield
        return
    if tracing is None:
        token = bind(request_id, parent)
        try:
            yield
        finally:
            unbind(request_id, token)
        return
    with tracing.span_for(name, parent, request_id):
        yield
