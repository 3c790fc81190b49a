"""The server span of each HTTP request, and its trace context bound to its request id
(pure ASGI, inside ``RequestMiddleware``: the request id is set, and the trace id it puts
in ``scope["state"]`` reaches the access log line).

A caller's W3C ``traceparent`` is continued; without one, a new trace starts. For as long
as the request runs, its context is bound to its request id (``observe/propagation.py``):
the spans of its stages (``observe/traces.py``), the ``traceparent`` the ``openai``
backend and the Ray client send on, and the exemplars of ``/metrics`` all find it there.
The probes (``/health``, ``/ready``, ``/metrics``) are not traced.

Added to the app only when tracing is on: off, no request pays anything for it.
"""

from __future__ import annotations

import time
from typing import Any

from ragserve.observe.propagation import bind, parse_traceparent, unbind
from ragserve.server.middleware import OPS_PATHS


class TraceMiddleware:
    def __init__(self, app: Any, tracing: Any) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPS_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        parent = parse_traceparent(headers.get(b"traceparent", b"").decode("latin-1"))
        state = scope.setdefault("state", {})
        request_id = state.get("request_id", "")
        method = scope["method"]
        span = self.tracing.start(method, parent, {
            "http.request.method": method, "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"), "ragserve.request_id": request_id}, time.time_ns())
        context = span.traceparent
        state["trace_id"] = context.trace_id
        token = bind(request_id, context)
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            unbind(request_id, token)
            route = getattr(scope.get("route"), "path", None)
            if route:
                span.name = f"{method} {route}"
                span.attributes["http.route"] = route
            span.attributes["http.response.status_code"] = status
            # A 5xx is the server's error; a 4xx the client's (the HTTP conventions).
            self.tracing.end(span, time.time_ns(), str(status) if status >= 500 else None)
