"""ragserve's error tree as HTTP: a status, and ``{"error": {"type", "message", "stage"}}``.

| error | status |
|---|---|
| ``InputError`` (empty, too long, not text, bad option), a body that does not validate | 400 / 422 |
| body over ``server.max_body_bytes`` | 413 |
| headers over ``server.max_header_bytes`` / ``max_headers`` (``limits.py``) | 431 |
| headers or body slower than ``server.header_timeout_s`` / ``body_timeout_s`` | 408 |
| every connection busy (``server.max_connections``, ``ops_connections``) | 503 |
| missing or wrong API key | 401 |
| ``OverloadedError`` | 429 + ``Retry-After`` (``server.retry_after_s``) |
| ``QuotaExceeded`` (the API key's own bucket) | 429 + ``Retry-After`` from the bucket |
| ``DeadlineExceededError`` | 504 |
| ``ShardUnavailableError`` (a shard of a sharded index has no live replica) | 503 + ``Retry-After`` |
| ``EngineDeadError``, ``GeneratorUnavailableError``, engine not ready, draining, index not servable | 503 |
| ``GenerationError`` (one request failed in the engine) | 502 |
| anything else | 500: a bug; the response says only the request id, the log has the traceback |

A response never carries a stack trace.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from starlette.responses import Response

from ragserve.errors import (
    DeadlineExceededError,
    EngineDeadError,
    GenerationError,
    GeneratorUnavailableError,
    IndexError_,
    InputError,
    OverloadedError,
    QuotaExceeded,
    RagserveError,
    ShardUnavailableError,
)

log = logging.getLogger("ragserve.server")


class HTTPError(Exception):
    """An error raised by the HTTP layer itself (auth, size, draining, model name)."""

    def __init__(self, status: int, type_: str, message: str, stage: str = "http",
                 headers: dict[str, str] | None = None, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.stage = status, type_, message, stage
        self.headers = headers or {}
        self.fields = fields or {}
        """More fields of the error body (OpenAI's ``param`` and ``code`` on its routes)."""


def describe(error: BaseException, request_id: str, retry_after_s: int = 1) -> HTTPError:
    """The HTTP form of any error a request can end with."""
    if isinstance(error, HTTPError):
        return error
    if isinstance(error, RagserveError):
        message = str(error)
        stage = error.stage
        name = type(error).__name__
        if isinstance(error, InputError):
            return HTTPError(400, name, message, stage)
        if isinstance(error, QuotaExceeded):  # whole seconds, never 0: a client retries after it
            wait = max(1, math.ceil(error.retry_after_s))
            return HTTPError(429, name, message, stage, {"Retry-After": str(wait)})
        if isinstance(error, OverloadedError):
            return HTTPError(429, name, message, stage, {"Retry-After": str(retry_after_s)})
        if isinstance(error, DeadlineExceededError):
            return HTTPError(504, name, message, stage)
        if isinstance(error, ShardUnavailableError):
            return HTTPError(503, name, message, stage, {"Retry-After": str(retry_after_s)})
        if isinstance(error, (EngineDeadError, GeneratorUnavailableError, IndexError_)):
            return HTTPError(503, name, message, stage)
        if isinstance(error, GenerationError):
            return HTTPError(502, name, message, stage)
        return HTTPError(500, name, message, stage)
    log.error("request %s failed with an unexpected error", request_id, exc_info=error)
    return HTTPError(500, "InternalError", f"internal error (request {request_id}); see the server log", "server")


def body(e: HTTPError) -> dict[str, Any]:
    return {"error": {"type": e.type, "message": e.message, "stage": e.stage, **e.fields}}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


def response(e: HTTPError) -> Response:
    """(``X-Request-Id`` is added by the middleware, on every response.)"""
    return json_response(body(e), e.status, e.headers)
