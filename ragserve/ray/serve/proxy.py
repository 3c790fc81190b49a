"""Serve's own HTTP refusals in the shape of ragserve's errors: a middleware for Serve's proxy.

What Ray Serve 2.60's HTTP proxy answers by itself (read in ``ray/serve/_private/
http_util.py`` and ``proxy.py``, and seen on this machine):

- **Its queue bound.** A request that finds every ingress replica at
  ``max_ongoing_requests`` waits in the proxy; past ``max_queued_requests`` waiting, the
  proxy's router raises ``BackPressureError`` and the proxy answers at once with the status
  of the deployment's ``BackpressureConfig`` (503 unless configured; ``app.py`` sets 429 and
  ``Retry-After: server.retry_after_s``) and a ``text/plain`` body: ``Request dropped due
  to backpressure (num_queued_requests=1, max_queued_requests=1).`` It counts a request
  as queued from its arrival until a replica takes it, so a burst arriving at one instant
  can be refused while replicas still have room (Serve's own note in ``router.py``).
- **No replica to send it to** (``DeploymentUnavailableError``): 503, ``text/plain``.
- **The replica died under the request** (``RayActorError``): the proxy starts no response
  at all, and uvicorn answers ``500 Internal Server Error`` in ``text/plain``.

ragserve's own app never answers in ``text/plain`` (its errors are JSON), so this
middleware rewrites exactly those: the queue bound becomes the single-process server's
429 ``OverloadedError`` (``{"error": {"type", "message", "stage"}}`` + ``Retry-After``),
an unavailable deployment a JSON 503, and a response that never started a JSON 503
``ReplicaUnavailable`` with ``Retry-After`` (Ray replaces the replica; the request is safe
to retry).

Serve loads proxy middlewares from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
(``ragserve.ray.serve.proxy:middlewares``) in the proxy's environment: ``run.py`` passes it
to the Serve controller it starts (proxies inherit it); on a cluster whose Serve is started
otherwise (KubeRay), set it in the nodes' environment. Without it the status and
``Retry-After`` are still right; only the body is Serve's text.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

CALLBACK = "ragserve.ray.serve.proxy:middlewares"
ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
RETRY_AFTER_ENV = "RAGSERVE_SERVER_RETRY_AFTER_S"
BACKPRESSURE = b"Request dropped due to backpressure"


def middlewares() -> list[Any]:
    """What Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    return [Middleware(ServeErrorsAsJSON, retry_after_s=int(os.environ.get(RETRY_AFTER_ENV, "1") or 1))]


def _error(status: int, type_: str, message: str, stage: str,
           retry_after_s: int | None) -> list[dict[str, Any]]:
    body = orjson.dumps({"error": {"type": type_, "message": message, "stage": stage}})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body}]


class ServeErrorsAsJSON:
    """Pure ASGI, outside Serve's proxy app (see the module docstring)."""

    def __init__(self, app: Any, retry_after_s: int = 1) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] | None = None
        started = False
        chunks: list[bytes] = []

        async def send_mapped(message: dict[str, Any]) -> None:
            nonlocal held, started
            kind = message["type"]
            if kind == "http.response.start":
                started = True
                if message["status"] in (429, 503) and _text_plain(message):
                    held = message  # Serve's own refusal: read its body before answering
                    return
            elif kind == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                for m in self._rewrite(held, b"".join(chunks)):
                    await send(m)
                return
            await send(message)

        await self.app(scope, receive, send_mapped)
        if not started:
            for m in _error(503, "ReplicaUnavailable", "the replica handling this request stopped before it "
                            "answered; Ray replaces it: retry", "server", self.retry_after_s):
                await send(m)

    def _rewrite(self, start: dict[str, Any], body: bytes) -> list[dict[str, Any]]:
        text = body.decode("utf-8", "replace").strip()
        headers = dict(start.get("headers") or [])
        extra = [(k, v) for k, v in start.get("headers") or [] if k.lower() == b"x-request-id"]
        if body.startswith(BACKPRESSURE):
            retry = headers.get(b"retry-after", str(self.retry_after_s).encode()).decode()
            messages = _error(429, "OverloadedError", f"[admission] overloaded: {text} "
                              "(ray.max_ongoing_requests, ray.max_queued_requests); retry later", "admission",
                              int(retry))
        else:
            messages = _error(503, "Unavailable", f"[server] {text or 'the application is not available'}; "
                              "retry later", "server", self.retry_after_s)
        messages[0]["headers"].extend(extra)
        return messages


def _text_plain(start: dict[str, Any]) -> bool:
    for key, value in start.get("headers") or []:
        if key.lower() == b"content-type":
            return value.startswith(b"text/plain")
    return False
