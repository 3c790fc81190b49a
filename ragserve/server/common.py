"""What the native and the OpenAI-compatible routes share: the served engine and its
state (``Served``), the request id, running a request until its client leaves, the first
stream event, and the JSON of a result and of a source."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from ragserve.config import RAGConfig
from ragserve.errors import InvalidParameterError
from ragserve.server.auth import ApiKeys
from ragserve.server.httperrors import HTTPError
from ragserve.server.middleware import ServingState
from ragserve.server.prometheus import PrometheusExporter
from ragserve.server.quotas import Quotas, make_quotas
from ragserve.server.tenants import Tenant
from ragserve.types import DoneEvent, QueryResult, SourcesEvent, StreamEvent

T = TypeVar("T")


class Served:
    """What the handlers share: the engine, the server's state, keys and exporter."""

    def __init__(self, config: RAGConfig, keys: ApiKeys | None) -> None:
        self.config = config
        self.keys = keys
        self.admin_key = config.server.admin_key
        self.state = ServingState()
        self.rag: Any = None
        self.exporter: PrometheusExporter | None = None
        self.connections: Any = None
        """The ``limits.ConnectionGuard`` of the server this app runs in (``uvicorn_options``)."""
        k = config.cache
        self.quotas: Quotas | None = make_quotas(keys.tenants, config.server.quota_redis_url, k.l2_timeout_ms,
                                                 k.l2_failures_to_open, k.l2_cooldown_s) if keys else None

    def tenant(self, request: Request, namespace: str | None) -> str | None:
        """With keys, the key's namespace (the body's is ignored); without, the body's."""
        if self.keys is None:
            return namespace
        return self.keys.namespace(request.headers.get("authorization"))

    def tenant_of(self, request: Request) -> Tenant | None:
        """The request's tenant, from its API key (None without keys; 401 for a bad key)."""
        return self.keys.tenant(request.headers.get("authorization")) if self.keys is not None else None

    async def admit(self, tenant: Tenant | None) -> None:
        """Take one request from ``tenant``'s quota, or raise ``QuotaExceeded`` (429 before
        the engine sees anything)."""
        if self.quotas is not None:
            await self.quotas.admit(tenant)

    async def charge(self, tenant: Tenant | None, result: QueryResult) -> None:
        """The tokens ``result`` generated, taken from its tenant's bucket."""
        if self.quotas is not None:
            await self.quotas.charge(tenant, result)

    def priority(self, request: Request, tenant: Tenant | None, asked: Any = None) -> Any:
        """The request's priority class: the body's, else the ``X-Priority`` header's, else
        the key's default (0 without keys); within the key's ``max_priority``. A value that
        is not an int is handed on as it is, for the engine's typed 400."""
        header = request.headers.get("x-priority")
        if asked is None and header is not None:
            try:
                asked = int(header.strip())
            except ValueError:
                raise InvalidParameterError("priority", header, "an int (the X-Priority header)") from None
        if tenant is None:
            return 0 if asked is None else asked
        if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool)):
            return asked
        return tenant.priority_of(asked)

    def check_engine(self) -> None:
        """A dead engine is 503 before anything starts (a stream would otherwise begin with
        its sources and end in an error event)."""
        if not self.rag.engine_alive():
            raise HTTPError(503, "EngineDeadError", "the generation engine is not running; retry elsewhere",
                            "generate")

    def check_key(self, request: Request) -> None:
        if self.keys is not None:
            self.keys.namespace(request.headers.get("authorization"))


async def charge_done(served: Served, tenant: Tenant | None, batch: list[StreamEvent]) -> None:
    """A stream's tokens, charged to its tenant when its ``DoneEvent`` goes by."""
    for event in batch:
        if isinstance(event, DoneEvent):
            await served.charge(tenant, event.result)


def request_id(request: Request) -> str:
    return request.scope["state"]["request_id"]


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` until it ends or the client goes away; then it is cancelled, which
    aborts its vLLM request and caches nothing (vLLM's server does the same)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    raise  # the handler itself is being cancelled (shutdown): not the client's doing
            except Exception:  # noqa: BLE001 - the work's own end no longer matters: the client left
                pass
    if task.cancelled():
        raise HTTPError(499, "ClientClosedRequest", "the client closed the connection", "http")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def first_event(events: AsyncIterator[StreamEvent]) -> SourcesEvent:
    """The first event, awaited before the response starts: refusals (overload, bad
    input) still get their own status code instead of a 200 that ends in an error."""
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise
    assert isinstance(first, SourcesEvent)
    return first


def result_json(r: QueryResult) -> dict[str, Any]:
    d = r.to_dict()
    d["sources"] = [source_json(s) for s in r.sources]
    return d


PARTIAL_HEADER = "X-Partial-Shards"
"""On an answer (or a stream) grounded without some shards of a sharded index
(``ray.allow_partial``): the missing shards' names, comma-separated."""


def partial_headers(missing_shards: Any = ()) -> dict[str, str]:
    """``X-Partial-Shards`` when shards are missing, else nothing."""
    return {PARTIAL_HEADER: ",".join(missing_shards)} if missing_shards else {}


def answer_headers(cache_tier: str, missing_shards: Any = ()) -> dict[str, str]:
    """``X-Cache``, and ``X-Partial-Shards`` when shards are missing."""
    return {"X-Cache": cache_tier, **partial_headers(missing_shards)}


def source_json(s: Any) -> dict[str, Any]:
    return {"doc_id": s.doc_id, "chunk_id": s.chunk_id, "score": round(float(s.score), 6), "text": s.text,
            "metadata": s.metadata}
