"""The FastAPI app of ``ragserve serve``: native API, operations, and the page.

Every handler is a thin call into the engine's public API (``aquery``, ``astream``,
``aretrieve``, ``stats``): the HTTP layer adds a request id, a tenant, error mapping and
framing, and nothing that changes an answer. Answers run on the engine's own loop thread;
an L1 hit is answered on the server's loop without a hop.

**Usage:** ``app = create_app(lambda: RAG.from_index("indexes/docs"), RAGConfig.load())``
then ``uvicorn.run(app)``; ``ragserve serve`` does this with a SIGTERM drain (``run.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, Response, StreamingResponse

from ragserve.config import RAGConfig
from ragserve.config.telemetry import trace_export
from ragserve.errors import IndexError_, RagserveError
from ragserve.server import sse
from ragserve.server.auth import ApiKeys, KeyCheck, check_admin, load_admin_key
from ragserve.server.common import (
    Served,
    answer_headers,
    charge_done,
    first_event,
    partial_headers,
    request_id,
    result_json,
    source_json,
    until_disconnected,
)
from ragserve.server.eval_api import add_eval_routes
from ragserve.server.httperrors import HTTPError, body, describe, json_response, response
from ragserve.server.mcp_http import add_mcp_route, key_user
from ragserve.server.middleware import RequestMiddleware
from ragserve.server.openai_api import add_openai_routes
from ragserve.server.prometheus import CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE, PrometheusExporter
from ragserve.server.quotas import QuotaMetrics
from ragserve.server.schemas import QueryRequest, RetrieveRequest
from ragserve.server.tenants import Tenant
from ragserve.server.tracing import TraceMiddleware
from ragserve.types import DoneEvent, SourcesEvent, StreamEvent, TokenEvent

log = logging.getLogger("ragserve.server")
STATIC = Path(__file__).parent / "static"


def create_app(rag: Any, config: RAGConfig, *, keys: ApiKeys | None = None, tracing: Any = None) -> FastAPI:
    """``rag``: a ``RAG`` the app serves and leaves open, or a function that opens one at
    start-up (the app then closes it at shutdown: engine stopped, cache writes flushed).
    ``tracing``: an ``observe.traces.Tracing`` to use instead of the one ``[telemetry]``
    asks for (none when tracing is off); the app shuts down only one it made itself."""
    served = Served(config, keys)
    own_tracing = tracing is None and trace_export(config.telemetry) != "off"
    if own_tracing:
        from ragserve.observe.traces import make_tracing  # OpenTelemetry only when tracing is on

        tracing = make_tracing(config)
    served.admin_key = load_admin_key(config.server)
    owned = callable(rag) and not hasattr(rag, "aquery")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # NOTE: opened on the server's own thread, not a worker: an embedded Redis dies
        # with the thread that started it (PR_SET_PDEATHSIG), and nothing is served yet.
        served.rag = rag() if owned else rag
        served.exporter = PrometheusExporter(served.rag, connections=lambda: served.connections,
                                             exemplars=tracing is not None)
        served.rag.observers.add(served.exporter)
        if served.quotas is not None:
            served.exporter.registry.register(QuotaMetrics(served.quotas))
        if tracing is not None:
            served.rag.observers.add(tracing)
        served.state.ready = True
        try:
            async with contextlib.AsyncExitStack() as stack:
                if mcp is not None:  # its sessions end before the engine closes
                    await stack.enter_async_context(mcp.session_manager.run())
                yield
        finally:
            served.state.ready = False
            served.rag.observers.remove(served.exporter)
            if tracing is not None:
                served.rag.observers.remove(tracing)
            if served.quotas is not None:
                await served.quotas.close()
            if owned:
                served.rag.close()
            if own_tracing:
                tracing.shutdown()  # the spans still queued are exported first

    # NOTE: redirect_slashes off: "/v1/query/" would be redirected to a Location built from
    # the request's Host header (a cache-poisoning vector); it is a 404 instead.
    app = FastAPI(title="ragserve", version=_version(), lifespan=lifespan, redirect_slashes=False,
                  description="A multi-tier RAG serving engine: answers with sources, timings and cache tier.")
    app.state.served = served
    _errors(app, served)
    _native_routes(app, served)
    _ops_routes(app, served)
    _admin_routes(app, served)
    add_eval_routes(app, served)
    add_openai_routes(app, served)
    mcp = add_mcp_route(app, served, _version()) if config.server.mcp else None
    if keys is not None:
        # inside RequestMiddleware: a 401 has its request id too
        app.add_middleware(KeyCheck, keys=keys, user=key_user if mcp is not None else None)
    if tracing is not None:  # inside RequestMiddleware: it reads the request id, and gives it the trace id
        app.add_middleware(TraceMiddleware, tracing=tracing)
    app.add_middleware(RequestMiddleware, state=served.state, max_body_bytes=config.server.max_body_bytes)
    return app


def _native_routes(app: FastAPI, served: Served) -> None:
    @app.post("/v1/query", summary="Answer a question (JSON, or Server-Sent Events with stream=true)")
    async def query(req: QueryRequest, request: Request) -> Response:
        rid = request_id(request)
        tenant = served.tenant_of(request)
        opts = dict(namespace=served.tenant(request, req.namespace), cache_read=req.cache.read,
                    cache_write=req.cache.write, timeout_s=req.timeout_s, request_id=rid, top_k=req.top_k,
                    priority=served.priority(request, tenant, req.priority), model=req.model)
        await served.admit(tenant)
        served.check_engine()
        if req.stream:
            events = served.rag.astream(req.question, **opts)
            first = await until_disconnected(request, first_event(events))
            frames = _native_sse(first, events, served, rid, tenant)
            return StreamingResponse(frames, media_type="text/event-stream",
                                     headers={**sse.HEADERS,
                                              **answer_headers(first.cache_tier, first.missing_shards)})
        result = await until_disconnected(request, served.rag.aquery(req.question, **opts))
        await served.charge(tenant, result)
        return json_response(result_json(result),
                             headers=answer_headers(result.cache_tier, result.missing_shards))

    @app.post("/v1/retrieve", summary="Retrieval only: the top-k sources with scores, no LLM")
    async def retrieve(req: RetrieveRequest, request: Request) -> Response:
        await served.admit(served.tenant_of(request))  # a request like any other: it takes one
        sources = await until_disconnected(request, served.rag.aretrieve(req.question, req.top_k))
        out = {"sources": [source_json(s) for s in sources], "request_id": request_id(request)}
        missing = getattr(sources, "missing_shards", ())
        if missing:  # the other shards' top-k: said in the body and a header
            out["missing_shards"] = list(missing)
        return json_response(out, headers=partial_headers(missing))

    @app.get("/v1/stats", summary="The engine's stats(): per-stage latency, cache tiers, gauges")
    async def stats(request: Request) -> Response:
        served.check_key(request)
        return json_response(served.rag.stats())


def _ops_routes(app: FastAPI, served: Served) -> None:
    @app.get("/health", summary="200 while the process and the engine are alive; 503 if dead or draining")
    async def health() -> Response:
        rag, state = served.rag, served.state
        alive = rag is not None and rag.engine_alive()
        status = "draining" if state.draining else "ok" if alive else "engine_dead"
        l2 = _l2_state(rag)
        if status == "ok" and l2 not in ("ok", "off"):
            status = "degraded"  # Redis is optional: degraded, still healthy
        return json_response({"status": status, "engine": "alive" if alive else "dead", "l2": l2},
                             200 if alive and not state.draining else 503)

    @app.get("/ready", summary="200 once the index is verified and the engine warm; 503 otherwise")
    async def ready() -> Response:
        rag, state = served.rag, served.state
        ok = state.ready and not state.draining and rag is not None and rag.engine_alive()
        return json_response({"ready": ok, "draining": state.draining, "l2": _l2_state(rag)}, 200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        assert served.exporter is not None
        if "application/openmetrics-text" in request.headers.get("accept", ""):  # with the exemplars
            return Response(served.exporter.render(openmetrics=True), media_type=OPENMETRICS_CONTENT_TYPE)
        return Response(served.exporter.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")


def _admin_routes(app: FastAPI, served: Served) -> None:
    @app.post("/admin/reload", summary="Open the index path again and swap the new version in (admin key)")
    async def reload(request: Request) -> Response:
        check_admin(served.admin_key, request.headers.get("authorization"))
        try:
            # Verifying hashes the files: off the event loop, so requests keep flowing.
            result = await asyncio.to_thread(served.rag.reload)
        except IndexError_ as e:  # the new index is refused; the current one keeps serving
            raise HTTPError(422, type(e).__name__, f"reload refused, still serving {served.rag.fingerprint[:16]}: "
                            f"{e}", "index") from None
        log.info("reload: %s", result)
        return json_response(result)

    @app.post("/admin/reset_prefix_cache", summary="Empty vLLM's prefix cache (benchmarks; admin key)")
    async def reset_prefix_cache(request: Request) -> Response:
        check_admin(served.admin_key, request.headers.get("authorization"))
        return json_response({"reset": await asyncio.to_thread(served.rag.reset_prefix_cache)})


def _errors(app: FastAPI, served: Served) -> None:
    retry = served.config.server.retry_after_s

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        return response(HTTPError(422, "InvalidRequest", _validation_message(e), "input"))

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, e: HTTPError) -> Response:
        return response(e)

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: Request, e: StarletteHTTPException) -> Response:
        """Starlette's own refusals (404 no such path, 405 wrong method) in the same shape."""
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(e.status_code, "HTTPError")
        return response(HTTPError(e.status_code, kind, f"{request.method} {request.url.path}: {e.detail}", "http",
                                  dict(e.headers or {})))

    @app.exception_handler(RagserveError)
    async def rag_error(request: Request, e: RagserveError) -> Response:
        return response(describe(e, request_id(request), retry))

    # NOTE: no handler for Exception: Starlette would answer it outside every middleware
    # (no X-Request-Id, no access line, the trace logged twice). RequestMiddleware answers it.


async def _native_sse(first: SourcesEvent, events: AsyncIterator[StreamEvent], served: Served,
                      rid: str, tenant: Tenant | None = None) -> AsyncIterator[bytes]:
    """``sources``, then ``token`` events (pieces that arrived together: one event, one
    write; see ``sse.py``), then ``done``."""
    try:
        head = {"sources": [source_json(s) for s in first.sources], "cache_tier": first.cache_tier}
        if first.missing_shards:
            head["missing_shards"] = list(first.missing_shards)
        yield sse.frame(head, "sources")
        async with contextlib.aclosing(sse.batches(events)) as batches:
            async for batch in batches:
                await charge_done(served, tenant, batch)
                out = b"".join(sse.token_frame(e.text) if isinstance(e, TokenEvent) else
                               sse.frame(result_json(e.result), "done") for e in sse.coalesce(batch)
                               if isinstance(e, (TokenEvent, DoneEvent)))
                if out:
                    yield out
    except Exception as e:  # noqa: BLE001 - after the headers, an error is the stream's last event
        yield sse.frame(body(describe(e, rid, served.config.server.retry_after_s)), "error")
    finally:
        await events.aclose()  # type: ignore[attr-defined]  # a client gone: the run is cancelled


def _l2_state(rag: Any) -> str:
    l2 = rag.cache.l2 if rag is not None and rag.cache is not None else None
    if l2 is None:
        return "off"
    return "ok" if l2.breaker.state == "closed" else f"unavailable (breaker {l2.breaker.state})"


def _validation_message(e: RequestValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request body is not valid"


def _version() -> str:
    from ragserve._version import __version__

    return __version__
