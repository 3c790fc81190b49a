"""``Client``: ``RAG``'s verbs over HTTP, blocking.

**Usage:**

    from ragserve import Client
    with Client("http://localhost:8000", api_key="KEY") as rag:   # was: RAG.from_index(...)
        r = rag.query("How does the with statement work?")
        print(r.answer, r.sources[0].doc_id, r.cache_tier)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ragserve.client import calls
from ragserve.client.calls import Attempts, Call
from ragserve.client.events import EventReader
from ragserve.client.failures import cut_short, timed_out, unreachable
from ragserve.client.retries import Retries
from ragserve.types import QueryResult, Source, StreamEvent

if TYPE_CHECKING:
    import httpx


class Client:
    """A ``ragserve serve`` server, with the verbs and return types of ``RAG``: ``query``,
    ``stream``, ``retrieve``, ``stats``. Errors are ``ragserve.errors`` classes, the ones
    the in-process API raises where one fits (see ``ragserve.client.failures``).

    ``api_key`` is sent as ``Authorization: Bearer KEY``. ``timeout_s`` bounds each wait
    for the server (a query's own ``timeout_s`` plus a grace when that is longer);
    ``connect_timeout_s`` each connection. Refusals that say "later" (429, 503) and
    connections that fail are tried again within ``retries`` (see ``Retries``): every verb
    may be sent again, a query too, as nothing is changed by one but the cache (a repeat of
    a finished one is a cache hit; one cut short was cancelled on the server and cached
    nothing). A stream is never sent again once its first event has arrived.

    Thread-safe: one ``Client`` (one connection pool) serves many threads.
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                 connect_timeout_s: float = 5.0, retries: Retries | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retries = retries or Retries()
        opened = calls.connection(self.url, api_key, headers, timeout_s, connect_timeout_s)
        self._http = httpx.Client(**opened)

    def query(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
              cache_write: bool = True, timeout_s: float | None = None,
              request_id: str | None = None, top_k: int | None = None,
              priority: int | None = None, model: str | None = None) -> QueryResult:
        """``RAG.query`` on the server: the same arguments, the same ``QueryResult``.
        ``namespace`` is ignored by a server with API keys (the key decides); ``priority``
        None is the key's default class (0 without keys); ``model`` one of the server's
        (``GET /v1/models``; None: its default), else ``UnknownModelError``."""
        call = calls.query_call(question, namespace=namespace, cache_read=cache_read, cache_write=cache_write,
                                timeout_s=timeout_s, request_id=request_id, top_k=top_k, stream=False,
                                client_timeout_s=self.timeout_s, priority=priority, model=model)
        return calls.query_result(self._send(call), call)

    def stream(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
               cache_write: bool = True, timeout_s: float | None = None,
               request_id: str | None = None, top_k: int | None = None,
               priority: int | None = None, model: str | None = None) -> Iterator[StreamEvent]:
        """``RAG.stream`` on the server: ``SourcesEvent``, ``TokenEvent`` pieces, ``DoneEvent``.
        The request is sent here, so a refusal raises before the first event; an error
        after it (an ``error`` event, a cut connection) raises from the iteration and is
        not tried again. Leaving the loop early closes the connection, which aborts the
        generation on the server."""
        call = calls.query_call(question, namespace=namespace, cache_read=cache_read, cache_write=cache_write,
                                timeout_s=timeout_s, request_id=request_id, top_k=top_k, stream=True,
                                client_timeout_s=self.timeout_s, priority=priority, model=model)
        return self._events(self._send(call), call)

    def retrieve(self, question: str, top_k: int | None = None) -> list[Source]:
        """``RAG.retrieve`` on the server: the top-k sources with scores, no LLM."""
        call = calls.retrieve_call(question, top_k, self.timeout_s)
        return calls.sources(self._send(call), call)

    def stats(self) -> dict[str, Any]:
        """``RAG.stats()`` of the server's engine (``GET /v1/stats``)."""
        call = calls.stats_call(self.timeout_s)
        return calls.json_of(self._send(call), call)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def _send(self, call: Call) -> httpx.Response:
        """The first successful response (streamed: its body not read yet), or the typed
        error of the last attempt."""
        import httpx

        attempts = Attempts(self.retries, self.url, call)
        while True:
            attempts.start()
            request = self._http.build_request(call.method, call.path, content=calls.body_bytes(call),
                                               headers=calls.headers(call), timeout=self._timeout(call))
            try:
                response = self._http.send(request, stream=call.stream)
                if response.status_code < 400:
                    return response
                response.read()
                response.close()
            except httpx.TransportError as e:
                time.sleep(attempts.failed(e))
                continue
            time.sleep(attempts.refused(response))

    def _timeout(self, call: Call) -> httpx.Timeout:
        import httpx

        return httpx.Timeout(call.read_timeout_s, connect=self.connect_timeout_s)

    def _events(self, response: httpx.Response, call: Call) -> Iterator[StreamEvent]:
        import httpx

        reader = EventReader(calls.response_request_id(response, call))
        try:
            for line in response.iter_lines():
                event = reader.feed(line)
                if event is not None:
                    yield event
        except httpx.TimeoutException as e:
            raise timed_out(self.url, call.read_timeout_s, e, reader.request_id) from e
        except httpx.TransportError as e:
            raise unreachable(self.url, e, reader.request_id) from e
        finally:
            response.close()
        if not reader.done:
            raise cut_short(self.url, reader.request_id)
