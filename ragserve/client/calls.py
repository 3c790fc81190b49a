"""What ``Client`` and ``AsyncClient`` share: the request each verb sends, the response
read back into ragserve's types, and the bookkeeping of attempts (``Attempts``). Neither
does I/O here: the two clients differ only in how they send and sleep."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ragserve.client.failures import from_body, timed_out, unreachable
from ragserve.client.retries import RETRY_STATUSES, Retries, retry_after_s
from ragserve.errors import QuestionTypeError, RagserveError, RemoteError, restore
from ragserve.types import QueryResult, Source, Sources

if TYPE_CHECKING:
    import httpx

QUERY_GRACE_S = 5.0
"""How much longer than a query's own ``timeout_s`` the client waits for its answer: the
server's deadline decides (a typed 504), not the connection's."""


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict[str, Any] | None
    request_id: str
    read_timeout_s: float
    stream: bool = False


def connection(url: str, api_key: str | None, headers: Any, timeout_s: float,
               connect_timeout_s: float) -> dict[str, Any]:
    """What ``httpx.Client`` and ``httpx.AsyncClient`` open with: the base URL, the key as a
    Bearer token beside the caller's headers, and the timeouts."""
    import httpx

    sent = {"Content-Type": "application/json", **(headers or {})}
    if api_key:
        sent["Authorization"] = f"Bearer {api_key}"
    return {"base_url": url, "headers": sent, "timeout": httpx.Timeout(timeout_s, connect=connect_timeout_s)}


def query_call(question: str, *, namespace: str | None, cache_read: bool, cache_write: bool,
               timeout_s: float | None, request_id: str | None, top_k: int | None, stream: bool,
               client_timeout_s: float, priority: int | None = None, model: str | None = None) -> Call:
    check_question(question)
    body: dict[str, Any] = {"question": question, "cache": {"read": cache_read, "write": cache_write}}
    if namespace is not None:
        body["namespace"] = namespace
    if top_k is not None:
        body["top_k"] = top_k
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    if priority is not None:  # else the API key's default class
        body["priority"] = priority
    if model is not None:  # else the server's default (or its router's pick)
        body["model"] = model
    if stream:
        body["stream"] = True
    read = client_timeout_s
    if timeout_s and not stream:  # a stream's timeout is per read: the server's deadline is wall-clock
        read = max(read, timeout_s + QUERY_GRACE_S)
    return Call("POST", "/v1/query", body, request_id or new_request_id(), read, stream)


def retrieve_call(question: str, top_k: int | None, client_timeout_s: float) -> Call:
    check_question(question)
    body: dict[str, Any] = {"question": question}
    if top_k is not None:
        body["top_k"] = top_k
    return Call("POST", "/v1/retrieve", body, new_request_id(), client_timeout_s)


def stats_call(client_timeout_s: float) -> Call:
    return Call("GET", "/v1/stats", None, new_request_id(), client_timeout_s)


def check_question(question: object) -> None:
    """Refused here as the in-process API refuses it (JSON would carry no ``bytes``); the
    rest of the validation is the server's, so it is the same for every client."""
    if not isinstance(question, str):
        error = QuestionTypeError(question)
        error.__dict__.update(status=None, request_id="", error_type="", retry_after_s=None, attempts=0)
        raise error


def new_request_id() -> str:
    """Sent as ``X-Request-Id`` and kept across retries: the server's log lines of every
    attempt carry it."""
    return uuid.uuid4().hex


def headers(call: Call) -> dict[str, str]:
    return {"X-Request-Id": call.request_id}


def body_bytes(call: Call) -> bytes | None:
    return None if call.body is None else orjson.dumps(call.body)


def response_request_id(response: httpx.Response, call: Call) -> str:
    return response.headers.get("x-request-id") or call.request_id


def json_of(response: httpx.Response, call: Call) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise restore(RemoteError, f"{call.path}: the answer is not JSON ({response.content[:200]!r})",
                      stage="http", status=response.status_code, error_type="", retry_after_s=None,
                      request_id=response_request_id(response, call)) from None


def query_result(response: httpx.Response, call: Call) -> QueryResult:
    return QueryResult.from_dict(json_of(response, call))


def sources(response: httpx.Response, call: Call) -> Sources:
    """``/v1/retrieve``'s sources; ``missing_shards``: the shards the server went without
    (``ray.allow_partial``), as ``RAG.retrieve``'s."""
    body = json_of(response, call)
    return Sources([Source.from_dict(s) for s in body["sources"]], body.get("missing_shards") or ())


class Attempts:
    """The attempts of one call: count them, map each failure to its typed error, and say
    how long to wait before the next one, or raise when there is to be none."""

    def __init__(self, retries: Retries, url: str, call: Call) -> None:
        self.retries = retries
        self.url = url
        self.call = call
        self.count = 0
        self.started = time.monotonic()

    def start(self) -> None:
        self.count += 1

    def refused(self, response: httpx.Response) -> float:
        """``response`` is an error (its body read): the wait before trying again."""
        wait = retry_after_s(response.headers.get("retry-after"))
        rid = response_request_id(response, self.call)
        error = from_body(response.status_code, response.content, rid, wait)
        return self._again(error, response.status_code in RETRY_STATUSES)

    def failed(self, cause: Exception) -> float:
        """The connection failed (an ``httpx.TransportError``): the wait before trying again.
        Only when no answer began can it be sent again; a timeout is final (the server may
        still be working on it: a second one would only add to its load)."""
        import httpx

        if isinstance(cause, httpx.TimeoutException) and not isinstance(cause, httpx.ConnectTimeout):
            raise self._give_up(timed_out(self.url, self.call.read_timeout_s, cause, self.call.request_id))
        again = isinstance(cause, (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout))
        return self._again(unreachable(self.url, cause, self.call.request_id), again)

    def _again(self, error: RagserveError, retryable: bool) -> float:
        if retryable:
            wait = self.retries.next_wait_s(self.count, getattr(error, "retry_after_s", None),
                                            time.monotonic() - self.started)
            if wait is not None:
                return wait
        raise self._give_up(error)

    def _give_up(self, error: RagserveError) -> RagserveError:
        error.attempts = self.count  # type: ignore[attr-defined]
        return error
