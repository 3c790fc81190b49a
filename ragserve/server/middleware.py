"""What every HTTP request goes through before its handler (pure ASGI: it never buffers a
streamed response, and the handler still sees the client's disconnect).

- ``X-Request-Id``: the client's (when it is 1–128 characters of ``[A-Za-z0-9._:-]``),
  else a new one; echoed on the response, used as the vLLM request id and in log lines.
- Body limit: a body over ``server.max_body_bytes`` is refused with 413, by its
  ``Content-Length`` before it is read, or as soon as a chunked body passes the limit.
- Draining: after SIGTERM, new requests get 503 (``/health``, ``/ready`` and ``/metrics``
  still answer, with 503 for the probes); requests already in flight are counted so the
  drain knows when they are done. When the grace period ends (or a second signal comes),
  uvicorn cancels what is left: a request whose answer has not begun gets a typed 503
  (``ShutDown``; its engine work is cancelled with it, so nothing is cached), one already
  streaming is cut off, without the ``done`` event.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from ragserve.server.httperrors import HTTPError, describe, response
from ragserve.server.logs import outcome

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
log = logging.getLogger("ragserve.server")
access = logging.getLogger("ragserve.access")
"""One line per request: request id, method, path, status, milliseconds, and ``trace=<trace id>``
when tracing is on (INFO)."""
OPS_PATHS = ("/health", "/ready", "/metrics")


class _BodyTooLarge(Exception):
    pass


class ServingState:
    """Shared by the middleware, the handlers and the runner."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self.in_flight = 0


class RequestMiddleware:
    def __init__(self, app: Any, state: ServingState, max_body_bytes: int) -> None:
        self.app = app
        self.state = state
        self.max_body = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = too_large = False
        seen = status = 0
        t0 = time.perf_counter()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal started, status
            if too_large and not started:
                return  # the app's answer to a body it could not read: replaced by the 413
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
                tier = next((v for k, v in message["headers"] if k.lower() == b"x-cache"), None)
                if tier is not None:
                    scope["state"]["cache_tier"] = tier.decode("latin-1")
            await send(message)

        if self.state.draining and scope["path"] not in OPS_PATHS:
            refusal = HTTPError(503, "Draining", "the server is shutting down; retry elsewhere", "server",
                                {"Connection": "close", "Retry-After": "1"})
            return await response(refusal)(scope, receive, send_with_id)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await response(_too_large(self.max_body))(scope, receive, send_with_id)

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    too_large = True
                    raise _BodyTooLarge()  # the app may turn this into its own error: see send_with_id
            return message

        counted = scope["path"] not in OPS_PATHS
        if counted:
            self.state.in_flight += 1
        try:
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            pass
        except asyncio.CancelledError:
            if not self.state.draining:
                raise
            # NOTE: not raised again: uvicorn would answer a plain-text 500 and log a traceback
            # for each request its shutdown cancels.
            log.warning("request %s aborted: the server shut down before it finished", request_id)
            if not started:
                await response(_shut_down())(scope, receive, send_with_id)
        except Exception as e:  # noqa: BLE001 - a bug: a typed 500 with the request id, logged once
            if not started:
                await response(describe(e, request_id))(scope, receive, send_with_id)
            else:
                log.error("request %s failed after its response began", request_id, exc_info=e)
        finally:
            if counted:
                self.state.in_flight -= 1
        if too_large and not started:
            too_large = False
            await response(_too_large(self.max_body))(scope, receive, send_with_id)
        if access.isEnabledFor(logging.INFO):
            _access_line(scope, request_id, status, (time.perf_counter() - t0) * 1e3)


def _access_line(scope: dict[str, Any], request_id: str, status: int, ms: float) -> None:
    state = scope["state"]
    trace_id = state.get("trace_id")  # set by server/tracing.py when tracing is on
    fields = {"request_id": request_id, "trace_id": trace_id, "tenant": state.get("tenant"),
              "method": scope["method"], "path": scope["path"], "status": status, "outcome": outcome(status),
              "cache_tier": state.get("cache_tier"), "total_ms": round(ms, 3)}
    access.info("%s %s %s %d %.1fms%s", request_id, scope["method"], scope["path"], status, ms,
                f" trace={trace_id}" if trace_id else "", extra={"access": fields})


def _shut_down() -> HTTPError:
    return HTTPError(503, "ShutDown", "the server shut down before this request finished (the drain's "
                     "grace period ended); nothing was cached; retry elsewhere", "server",
                     {"Connection": "close", "Retry-After": "1"})


def _too_large(limit: int) -> HTTPError:
    return HTTPError(413, "PayloadTooLarge", f"the request body is over the limit of {limit} bytes "
                     "(server.max_body_bytes)", "http")
