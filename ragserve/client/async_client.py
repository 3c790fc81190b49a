"""``AsyncClient``: ``RAG``'s async verbs over HTTP, for any event loop.

**Usage:**

    from ragserve import AsyncClient
    async with AsyncClient("http://localhost:8000", api_key="KEY") as rag:
        r = await rag.aquery("How does the with statement work?")    # was: await rag.aquery(...) on a RAG
        async for ev in rag.astream("What is a lambda expression?"):
            print(getattr(ev, "text", ""), end="")
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from ragserve.client import calls
from ragserve.client.calls import Attempts, Call
from ragserve.client.events import EventReader
from ragserve.client.failures import cut_short, timed_out, unreachable
from ragserve.client.retries import Retries
from ragserve.types import QueryResult, Source, StreamEvent

if TYPE_CHECKING:
    import httpx


class AsyncClient:
    """``Client`` for event loops, with ``RAG``'s async names: ``aquery``, ``astream``,
    ``aretrieve``, and ``astats`` (``RAG.stats`` is blocking; over HTTP it waits for the
    network). The same arguments, types, errors, timeouts and ``retries`` as ``Client``;
    a task cancelled while it waits closes its connection, which aborts the request on the
    server. ``astream`` sends its request at the first ``anext``."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                 connect_timeout_s: float = 5.0, retries: Retries | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retries = retries or Retries()
        opened = calls.connection(self.url, api_key, headers, timeout_s, connect_timeout_s)
        self._http = httpx.AsyncClient(**opened)

    async def aquery(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
                     cache_write: bool = True, timeout_s: float | None = None,
                     request_id: str | None = None, top_k: int | None = None,
                     priority: int | None = None, model: str | None = None) -> QueryResult:
        """``RAG.aquery`` on the server."""
        call = calls.query_call(question, namespace=namespace, cache_read=cache_read, cache_write=cache_write,
                                timeout_s=timeout_s, request_id=request_id, top_k=top_k, stream=False,
                                client_timeout_s=self.timeout_s, priority=priority, model=model)
        return calls.query_result(await self._send(call), call)

    async def astream(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
                      cache_write: bool = True, timeout_s: float | None = None,
                      request_id: str | None = None, top_k: int | None = None,
                      priority: int | None = None, model: str | None = None) -> AsyncIterator[StreamEvent]:
        """``RAG.astream`` on the server: ``async for ev in client.astream(q): ...``"""
        call = calls.query_call(question, namespace=namespace, cache_read=cache_read, cache_write=cache_write,
                                timeout_s=timeout_s, request_id=request_id, top_k=top_k, stream=True,
                                client_timeout_s=self.timeout_s, priority=priority, model=model)
        import httpx

        response = await self._send(call)
        reader = EventReader(calls.response_request_id(response, call))
        try:
            async for line in response.aiter_lines():
                event = reader.feed(line)
                if event is not None:
                    yield event
        except httpx.TimeoutException as e:
            raise timed_out(self.url, call.read_timeout_s, e, reader.request_id) from e
        except httpx.TransportError as e:
            raise unreachable(self.url, e, reader.request_id) from e
        finally:
            await response.aclose()
        if not reader.done:
            raise cut_short(self.url, reader.request_id)

    async def aretrieve(self, question: str, top_k: int | None = None) -> list[Source]:
        """``RAG.aretrieve`` on the server."""
        call = calls.retrieve_call(question, top_k, self.timeout_s)
        return calls.sources(await self._send(call), call)

    async def astats(self) -> dict[str, Any]:
        """``RAG.stats()`` of the server's engine."""
        call = calls.stats_call(self.timeout_s)
        return calls.json_of(await self._send(call), call)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r})"

    async def _send(self, call: Call) -> httpx.Response:
        import httpx

        attempts = Attempts(self.retries, self.url, call)
        while True:
            attempts.start()
            request = self._http.build_request(
                call.method, call.path, content=calls.body_bytes(call), headers=calls.headers(call),
                timeout=httpx.Timeout(call.read_timeout_s, connect=self.connect_timeout_s))
            try:
                response = await self._http.send(request, stream=call.stream)
                if response.status_code < 400:
                    return response
                await response.aread()
                await response.aclose()
            except httpx.TransportError as e:
                await asyncio.sleep(attempts.failed(e))
                continue
            await asyncio.sleep(attempts.refused(response))
