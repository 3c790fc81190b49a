"""HTTP failures back into ragserve's error tree: the class the in-process API raises,
from the server's ``{"error": {"type", "message", "stage"}}`` body.

| the server says | the client raises |
|---|---|
| a ``type`` that names a class of ``ragserve.errors`` (``EmptyQuestionError``, | that class |
| ``OverloadedError``, ``DeadlineExceededError``, ``EngineDeadError``, ...) | |
| ``Unauthorized`` (401) | ``AuthError`` |
| ``InvalidRequest`` (422: a field out of range, an unknown field) | ``InvalidParameterError`` |
| ``PayloadTooLarge`` (413) | ``InputError`` |
| another ``type``, or a body not ragserve's, with 400/413/422 | ``InputError`` |
| ... with 401/403, 429, 504 | ``AuthError``, ``OverloadedError``, ``DeadlineExceededError`` |
| ... with any other status (``NotFound``, ``InternalError``, | ``RemoteError`` |
| ``Draining``, ``ShutDown``, a proxy's page) | |
| no HTTP answer: refused, reset, cut | ``ServerUnreachableError`` |
| no answer within the client's own timeout | ``DeadlineExceededError`` |

Each carries ``status`` (None for an error event inside a stream and without an answer),
``request_id``, ``error_type`` (the server's ``type``), ``retry_after_s`` and the stage
and message the server gave; ``attempts`` is set when the client gives up.
"""

from __future__ import annotations

from typing import Any

import orjson

from ragserve.errors import (
    AuthError,
    DeadlineExceededError,
    InputError,
    InvalidParameterError,
    OverloadedError,
    RagserveError,
    RemoteError,
    ServerUnreachableError,
    restore,
)

ALIASES: dict[str, type[RagserveError]] = {
    "Unauthorized": AuthError,
    "InvalidRequest": InvalidParameterError,
    "PayloadTooLarge": InputError,
}
"""The server's own names for refusals that happen before the engine sees the request."""

BY_STATUS: dict[int, type[RagserveError]] = {
    400: InputError, 401: AuthError, 403: AuthError, 413: InputError, 422: InputError,
    429: OverloadedError, 504: DeadlineExceededError,
}
"""For an error ``type`` the client does not know (a newer server, a proxy)."""


def _tree() -> dict[str, type[RagserveError]]:
    found: dict[str, type[RagserveError]] = {}
    todo: list[type[RagserveError]] = [RagserveError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == RagserveError.__module__:
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


CLASSES = _tree()
"""Every class of ``ragserve.errors`` by the name the server sends (``type(e).__name__``)."""


def error_class(error_type: str, status: int | None) -> type[RagserveError]:
    return (ALIASES.get(error_type) or CLASSES.get(error_type)
            or (BY_STATUS.get(status) if status is not None else None) or RemoteError)


def from_body(status: int | None, content: bytes, request_id: str,
              retry_after_s: float | None = None) -> RagserveError:
    """The error an error response (or a stream's ``error`` event) stands for."""
    try:
        payload: Any = orjson.loads(content)
        detail = payload["error"]
        error_type, message = str(detail["type"]), str(detail["message"])
        stage = detail.get("stage")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        text = content[:200].decode("utf-8", "replace").strip()
        message = f"HTTP {status}: {text or 'no body'} (not a ragserve error body)"
        error_type, stage = "", None
    cls = error_class(error_type, status)
    stage = str(stage) if stage else cls.stage
    prefix = f"[{stage}] "
    if message.startswith(prefix):  # the server sends str(error), which carries its stage
        message = message[len(prefix):]
    return restore(cls, message, stage=stage, status=status, request_id=request_id, error_type=error_type,
                   retry_after_s=retry_after_s)


def unreachable(url: str, cause: BaseException, request_id: str) -> ServerUnreachableError:
    what = f"{type(cause).__name__}: {cause}"
    error = restore(ServerUnreachableError, f"{url}: no answer from the server ({what})", stage="http",
                    status=None, request_id=request_id, error_type="", retry_after_s=None)
    error.__cause__ = cause
    return error


def timed_out(url: str, timeout_s: float, cause: BaseException, request_id: str) -> DeadlineExceededError:
    error = restore(DeadlineExceededError,
                    f"{url}: no answer within the client's timeout of {timeout_s:g} s; the connection was "
                    "closed, which aborts the request on the server", stage="deadline", timeout_s=timeout_s,
                    status=None, request_id=request_id, error_type="", retry_after_s=None)
    error.__cause__ = cause
    return error


def cut_short(url: str, request_id: str) -> ServerUnreachableError:
    return restore(ServerUnreachableError, f"{url}: the stream ended before its done event (the connection "
                   "was cut)", stage="http", status=None, request_id=request_id, error_type="",
                   retry_after_s=None)
