"""OpenTelemetry traces of requests, built after the fact from the ``Timings`` each result
carries: one source of truth, no second clock (docs/observability.md).

``Tracing`` is a request observer (``observers.py``). When a request ends, its stage times
become spans under the request's own context (the HTTP server span that ``bind`` made
current for its request id, in ``propagation.py``), laid out on the wall clock:

    POST /v1/query                       (server span, ``server/tracing.py``)
    └─ ragserve.query                    total
       ├─ ragserve.cache.lookup          cache_l1 + cache_l2   (ragserve.cache.tier)
       ├─ ragserve.admission             admission
       ├─ ragserve.embed_wait            embed_wait
       ├─ embeddings {model}             embed
       ├─ retrieval                      search   (gen_ai.data_source.id, top_k, scores)
       ├─ ragserve.docload               docload
       ├─ ragserve.prompt                prompt
       └─ chat {model}                   generate (gen_ai.usage.*, gen_ai.latency.*)

The cache lookups start with the request; the miss path's stages end where the request
ends, back to back, in pipeline order: each span lasts exactly its stage's time; the gaps
(the hop to the engine loop, the cache write) are the parent's. A request answered by an
identical request's run (single-flight, ``shared``) did not run those stages: after its
cache lookup comes one ``ragserve.single_flight.join`` span (the rest of its total) with a
link to the leader's request span, ``ragserve.single_flight.leader`` (the leader's request
id) and the run's stage times as ``ragserve.run.<stage>_ms``; the stages themselves are in
the leader's trace.

Names follow the OpenTelemetry GenAI semantic conventions **v0.1.0** (the
``semantic-conventions-genai`` repository's first release; Development status) where
they exist; vLLM's latency attributes (``gen_ai.latency.*``) as vLLM emits them; ragserve's
own under ``ragserve.*``. Content (question, answer, sources' text) only with
``telemetry.capture_content``.

This module imports OpenTelemetry at its top: only ``make_tracing`` imports it, and only
when tracing is on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ragserve.observe.propagation import TraceParent, bind, context_for, unbind

log = logging.getLogger("ragserve.tracing")
GENAI_SEMCONV = "0.1.0"
"""The version of the OpenTelemetry GenAI semantic conventions these spans follow."""
_MS = 1_000_000  # ns per ms
_RUN_STAGES = ("admission", "embed_wait", "embed", "search", "docload", "prompt", "generate")


class Tracing:
    """Spans of every request: an observer (``rag.observers.add(tracing)``) plus the server
    span of the HTTP edge (``server_span``).

    ``exporter``: where spans go (an OTLP exporter, the SDK's ``InMemorySpanExporter`` in a
    test); ``service``: ``service.name``; ``embed_model``, ``backend``, ``top_k``: what the
    spans name (``gen_ai.request.model`` of the embeddings, ``gen_ai.provider.name`` of the
    chat, ``gen_ai.retrieval.top_k`` of the retrieval)."""

    def __init__(self, exporter: SpanExporter, *, service: str = "ragserve", sample_ratio: float = 1.0,
                 capture_content: bool = False, embed_model: str = "", backend: str = "", top_k: int = 0) -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}),
                                       sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("ragserve", schema_url="https://opentelemetry.io/schemas/1.45.0")
        self.capture_content = capture_content
        self.embed_model = embed_model
        self.backend = backend
        self.top_k = top_k
        self._leaders: OrderedDict[int, tuple[weakref.ref[Any], str, TraceParent | None]] = OrderedDict()
        self._lock = threading.Lock()

    # -- the HTTP edge ------------------------------------------------------------------

    def server_span(self, name: str, parent: TraceParent | None, attributes: Mapping[str, Any],
                    start_ns: int) -> tuple[Any, TraceParent]:
        """Start the server span of one HTTP request (a child of the caller's ``traceparent``
        when it sent one); returns the span and its context, to ``bind`` for the request."""
        span = self.tracer.start_span(name, context=_context(parent, remote=True), kind=SpanKind.SERVER,
                                      attributes=attributes, start_time=start_ns)
        sc = span.get_span_context()
        return span, TraceParent(f"{sc.trace_id:032x}", f"{sc.span_id:016x}", sc.trace_flags.sampled)

    @contextmanager
    def span_for(self, name: str, parent: TraceParent, request_id: str) -> Iterator[None]:
        """A server span for ``request_id``'s work in this process (a Ray replica's part of
        a request), bound to it while it runs; an exception marks it as an error."""
        span = self.tracer.start_span(name, context=_context(parent, remote=True), kind=SpanKind.SERVER,
                                      attributes={"ragserve.request_id": request_id})
        sc = span.get_span_context()
        token = bind(request_id, TraceParent(f"{sc.trace_id:032x}", f"{sc.span_id:016x}", sc.trace_flags.sampled))
        try:
            yield
        except BaseException as e:
            span.set_status(Status(StatusCode.ERROR, type(e).__name__))
            raise
        finally:
            unbind(request_id, token)
            span.end()

    # -- the request observer -----------------------------------------------------------

    def on_generation(self, result: Any) -> None:
        """A run of the miss path ended: remember its leader, for the requests that share it."""
        usage = result.usage  # the one object every request's copy of this run shares
        with self._lock:
            self._leaders[id(usage)] = (weakref.ref(usage), result.request_id, context_for(result.request_id))
            while len(self._leaders) > 4096:
                self._leaders.popitem(last=False)

    def on_result(self, result: Any, stages: Mapping[str, float]) -> None:
        end = time.time_ns()
        start = end - round(stages.get("total", 0.0) * _MS)
        parent = context_for(result.request_id)
        links, leader = self._leader(result)
        root = self.tracer.start_span("ragserve.query", context=_context(parent), start_time=start,
                                      attributes=self._query_attributes(result, leader), links=links)
        if root.is_recording():
            ctx = trace.set_span_in_context(root)
            self._cache_span(ctx, result, stages, start)
            self._run_spans(ctx, result, stages, end, links, leader)
        root.end(end_time=end)

    def on_error(self, error: BaseException) -> None:
        pass  # the server span carries the status; the error's request has no result

    def flush(self, timeout_ms: int = 30_000) -> bool:
        return self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        self.provider.shutdown()

    # -- building ----------------------------------------------------------------------

    def _leader(self, result: Any) -> tuple[Sequence[Link], str | None]:
        if not result.shared:
            return (), None
        with self._lock:
            entry = self._leaders.get(id(result.usage))
        if entry is None or entry[0]() is not result.usage:
            return (), None
        _, leader_id, context = entry
        if context is None:
            return (), leader_id
        return [Link(_span_context(context), {"ragserve.link": "single_flight.leader"})], leader_id

    def _query_attributes(self, result: Any, leader: str | None) -> dict[str, Any]:
        a: dict[str, Any] = {"ragserve.request_id": result.request_id, "ragserve.cache.tier": result.cache_tier,
                             "ragserve.index.fingerprint": result.index_fingerprint,
                             "ragserve.single_flight.shared": bool(result.shared)}
        if leader is not None:
            a["ragserve.single_flight.leader"] = leader
        if self.capture_content:
            a["ragserve.question"] = result.question
            a["ragserve.answer"] = result.answer
        return a

    def _child(self, ctx: Any, name: str, start: int, ms: float, attributes: Mapping[str, Any],
               kind: SpanKind = SpanKind.INTERNAL) -> int:
        end = start + round(ms * _MS)
        self.tracer.start_span(name, context=ctx, kind=kind, start_time=start,
                               attributes=attributes).end(end_time=end)
        return end

    def _cache_span(self, ctx: Any, result: Any, stages: Mapping[str, float], start: int) -> None:
        ms = stages.get("cache_l1", 0.0) + stages.get("cache_l2", 0.0)
        if "cache_l1" not in stages and "cache_l2" not in stages:
            return  # the request did not read the cache
        hit = result.cache_tier in ("l1", "l2")
        tiers = [t for t in ("l1", "l2") if f"cache_{t}" in stages]
        self._child(ctx, "ragserve.cache.lookup", start, ms, {
            "ragserve.cache.tier": result.cache_tier, "ragserve.cache.hit": hit,
            "ragserve.cache.tiers_asked": tiers,
            "ragserve.cache.l1_ms": stages.get("cache_l1", 0.0), "ragserve.cache.l2_ms": stages.get("cache_l2", 0.0)})

    def _run_spans(self, ctx: Any, result: Any, stages: Mapping[str, float], end: int,
                   links: Sequence[Link], leader: str | None) -> None:
        ran = [s for s in _RUN_STAGES if s in stages]
        if not ran or result.cache_tier != "miss":
            return
        if result.shared:  # the run is the leader's, in the leader's trace: here, the wait for it
            looked = round((stages.get("cache_l1", 0.0) + stages.get("cache_l2", 0.0)) * _MS)
            start = end - round(stages.get("total", 0.0) * _MS) + looked
            attributes: dict[str, Any] = {f"ragserve.run.{s}_ms": stages[s] for s in ran}
            if leader is not None:
                attributes["ragserve.single_flight.leader"] = leader
            self.tracer.start_span("ragserve.single_flight.join", context=ctx, start_time=start, links=links,
                                   attributes=attributes).end(end_time=end)
            return
        t = end - round(sum(stages[s] for s in ran) * _MS)
        for stage in ran:
            name, kind, attributes = self._stage(stage, result, stages)
            t = self._child(ctx, name, t, stages[stage], attributes, kind)

    def _stage(self, stage: str, result: Any, stages: Mapping[str, float]) -> tuple[str, SpanKind, dict[str, Any]]:
        if stage == "embed":
            return (f"embeddings {self.embed_model}".strip(), SpanKind.INTERNAL,
                    {"gen_ai.operation.name": "embeddings", "gen_ai.request.model": self.embed_model})
        if stage == "search":
            return "retrieval", SpanKind.INTERNAL, self._retrieval_attributes(result)
        if stage == "generate":
            return f"chat {result.model}".strip(), SpanKind.CLIENT, self._chat_attributes(result, stages)
        return f"ragserve.{stage}", SpanKind.INTERNAL, {}

    def _retrieval_attributes(self, result: Any) -> dict[str, Any]:
        sources = result.sources
        a: dict[str, Any] = {
            "gen_ai.operation.name": "retrieval", "gen_ai.data_source.id": result.index_fingerprint,
            # NOTE: the configured top_k: a request's own top_k is not in its result.
            "gen_ai.retrieval.top_k": self.top_k, "ragserve.retrieval.used": len(sources),
            "ragserve.retrieval.scores": [float(s.score) for s in sources],
            "ragserve.retrieval.chunk_ids": [int(s.chunk_id) for s in sources],
            "ragserve.retrieval.dropped": result.dropped_sources}
        if self.capture_content:
            a["gen_ai.retrieval.query.text"] = result.question
            a["gen_ai.retrieval.documents"] = json.dumps(
                [{"id": f"{s.doc_id}#{s.chunk_id}", "score": float(s.score), "content": s.text} for s in sources])
        return a

    def _chat_attributes(self, result: Any, stages: Mapping[str, float]) -> dict[str, Any]:
        a: dict[str, Any] = {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": self.backend or "ragserve",
            "gen_ai.request.model": result.model, "gen_ai.response.model": result.model,
            "gen_ai.usage.input_tokens": result.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": result.usage.completion_tokens,
            # vLLM's own request-span attributes (seconds), from the stage split vLLM reports.
            "gen_ai.latency.time_in_queue": stages.get("generate_queue", 0.0) / 1e3,
            "gen_ai.latency.time_to_first_token": stages.get("generate_first_token", 0.0) / 1e3,
            "gen_ai.latency.time_in_model_decode": stages.get("generate_decode", 0.0) / 1e3,
            "gen_ai.latency.e2e": stages.get("generate", 0.0) / 1e3}
        if result.finish_reason:
            a["gen_ai.response.finish_reasons"] = [result.finish_reason]
        if self.capture_content:
            a["gen_ai.output.messages"] = json.dumps(
                [{"role": "assistant", "parts": [{"type": "text", "content": result.answer}],
                  "finish_reason": result.finish_reason or "stop"}])
        return a


def _span_context(p: TraceParent, remote: bool = False) -> SpanContext:
    return SpanContext(int(p.trace_id, 16), int(p.span_id, 16), is_remote=remote,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED if p.sampled else TraceFlags.DEFAULT))


def _context(parent: TraceParent | None, remote: bool = False) -> Any:
    return None if parent is None else trace.set_span_in_context(NonRecordingSpan(_span_context(parent, remote)))


def end_server_span(span: Any, status: int, end_ns: int) -> None:
    """End an HTTP server span: ``http.response.status_code``, and an error status for a 5xx
    (a 4xx is the client's, per the HTTP conventions)."""
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end(end_time=end_ns)


def make_exporter(kind: str, endpoint: str = "") -> SpanExporter:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()


def make_tracing(config: Any, exporter: SpanExporter | None = None) -> Tracing:
    """The ``Tracing`` a ``RAGConfig``'s ``[telemetry]`` asks for (``exporter`` instead of
    the configured one: a test's in-memory exporter)."""
    import os

    from ragserve.config.telemetry import trace_export

    t = config.telemetry
    service = t.service_name or os.environ.get("OTEL_SERVICE_NAME", "") or "ragserve"
    return Tracing(exporter or make_exporter(trace_export(t), t.endpoint), service=service,
                   sample_ratio=t.sample_ratio, capture_content=t.capture_content,
                   embed_model=config.embed.model, backend=config.generate.backend, top_k=config.query.top_k)
