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

The names and attributes are ``genai.py``'s: the OpenTelemetry GenAI semantic conventions
v0.1.0 where they have one. Content only with ``telemetry.capture_content``.

Every span here is built after the fact, as the SDK's finished-span type (``ReadableSpan``,
what every exporter reads), never started and ended through an SDK tracer: a request pays
only a note in a queue (``on_result``, ``end``); the one tracing thread builds the spans (at
most 0.1 s later) and exports them in batches. The sampling decision is taken once per
trace, where it starts (a caller's ``traceparent`` flags, else ``sample_ratio``).

This module imports OpenTelemetry at its top: only ``make_tracing`` imports it, and only
when tracing is on.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ragserve.observe.genai import Naming, query_attributes
from ragserve.observe.propagation import TraceParent, bind, context_for, unbind
from ragserve.observe.timing import stage_layout

log = logging.getLogger("ragserve.tracing")
_MS = 1_000_000  # ns per ms
_SCHEMA = "https://opentelemetry.io/schemas/1.45.0"
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_ids = RandomIdGenerator()
_WAKE_AT = 256  # notes pending before the tracing thread is woken early
_BUILD_EVERY_S = 0.1
_MAX_PENDING = 8_192  # past it (an exporter stuck in its retries) new notes are dropped and counted
_EXPORT_BATCH = 512
# The miss path's stages in pipeline order, read from ``Timings`` (a new stage is a new span).
_RUN_STAGES = tuple(s for s in stage_layout()[0] if not s.startswith("cache_"))


class OpenSpan:
    """A span being timed at the edge (an HTTP request, a Ray replica's call): its ids are
    fixed at the start, so its work can be bound to it; it becomes a ``ReadableSpan`` when
    ``Tracing.end`` is given its end."""

    __slots__ = ("name", "context", "parent", "attributes", "start", "kind")

    def __init__(self, name: str, context: SpanContext, parent: SpanContext | None,
                 attributes: dict[str, Any], start: int, kind: SpanKind) -> None:
        self.name, self.context, self.parent = name, context, parent
        self.attributes, self.start, self.kind = attributes, start, kind

    @property
    def traceparent(self) -> TraceParent:
        c = self.context
        return TraceParent(f"{c.trace_id:032x}", f"{c.span_id:016x}", c.trace_flags.sampled)


class Tracing:
    """Spans of every request: an observer (``rag.observers.add(tracing)``), and the spans
    of the edges (``start`` / ``end``: the HTTP server span, a Ray replica's span).

    ``exporter``: where spans go (an OTLP exporter, the SDK's ``InMemorySpanExporter`` in a
    test); ``service``: ``service.name``; ``embed_model``, ``backend``, ``top_k``: what the
    spans name (``gen_ai.request.model`` of the embeddings, ``gen_ai.provider.name`` of the
    chat, ``gen_ai.retrieval.top_k`` of the retrieval)."""

    def __init__(self, exporter: SpanExporter, *, service: str = "ragserve", sample_ratio: float = 1.0,
                 capture_content: bool = False, embed_model: str = "", backend: str = "",
                 top_k: int = 0) -> None:
        self.exporter = exporter
        self._resource = Resource.create({"service.name": service})
        self._sampler = ParentBased(TraceIdRatioBased(sample_ratio))
        self._scope = InstrumentationScope("ragserve", _version(), _SCHEMA)
        self.naming = Naming(capture_content, embed_model, backend, top_k)
        self.dropped = 0
        self._leaders: OrderedDict[int, tuple[weakref.ref[Any], str, TraceParent | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._batch: list[ReadableSpan] = []
        self._wake = threading.Event()
        self._building = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="ragserve-tracing", daemon=True)
        self._thread.start()

    # -- the edges ----------------------------------------------------------------------

    def start(self, name: str, parent: TraceParent | None, attributes: dict[str, Any], start_ns: int,
              kind: SpanKind = SpanKind.SERVER) -> OpenSpan:
        """A span of this process's part of a request, the child of the caller's context
        when there is one (its sampled flag decides), else the root of a new trace."""
        if parent is None:
            trace_id, parent_sc = _ids.generate_trace_id(), None
            sampled = self._sampler.should_sample(None, trace_id, name).decision.is_sampled()
        else:
            trace_id, sampled = int(parent.trace_id, 16), parent.sampled
            parent_sc = _span_context(parent, remote=True)
        flags = _SAMPLED if sampled else TraceFlags(TraceFlags.DEFAULT)
        context = SpanContext(trace_id, _ids.generate_span_id(), is_remote=False, trace_flags=flags)
        return OpenSpan(name, context, parent_sc, attributes, start_ns, kind)

    def end(self, span: OpenSpan, end_ns: int, error: str | None = None) -> None:
        if span.context.trace_flags.sampled:
            self._note(self._finished, (span, end_ns, error))

    @contextmanager
    def span_for(self, name: str, parent: TraceParent, request_id: str) -> Iterator[None]:
        """A span for ``request_id``'s work in this process (a Ray replica's part of a
        request), bound to it while it runs; an exception marks it as an error."""
        span = self.start(name, parent, {"ragserve.request_id": request_id}, time.time_ns())
        token = bind(request_id, span.traceparent)
        error = None
        try:
            yield
        except BaseException as e:
            error = type(e).__name__
            raise
        finally:
            unbind(request_id, token)
            self.end(span, time.time_ns(), error)

    # -- the request observer -----------------------------------------------------------

    def on_generation(self, result: Any) -> None:
        """A run of the miss path ended: remember its leader, for the requests that share it."""
        usage = result.usage  # the one object every request's copy of this run shares
        with self._lock:
            self._leaders[id(usage)] = (weakref.ref(usage), result.request_id, context_for(result.request_id))
            while len(self._leaders) > 4096:
                self._leaders.popitem(last=False)

    def on_result(self, result: Any, stages: Mapping[str, float]) -> None:
        """Note the request's end and context (its binding ends with it); its spans are
        built on the tracing thread."""
        parent = context_for(result.request_id)
        if parent is None or parent.sampled:
            self._note(self._build, (result, stages, time.time_ns(), parent))

    def on_error(self, error: BaseException) -> None:
        pass  # the server span carries the status; the error's request has no result

    def flush(self, timeout_ms: int = 30_000) -> bool:
        """Build and export everything noted so far (tests, shutdown)."""
        self._drain()
        return self.exporter.force_flush(timeout_ms)

    def shutdown(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._drain()
        self.exporter.shutdown()

    # -- the tracing thread -------------------------------------------------------------

    def _note(self, build: Callable[..., None], args: tuple[Any, ...]) -> None:
        if len(self._pending) >= _MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append((build, args))
        if len(self._pending) >= _WAKE_AT:
            self._wake.set()

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(_BUILD_EVERY_S)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        with self._building:  # one builder, one exporter call at a time
            built = 0
            while self._pending:
                build, args = self._pending.popleft()
                try:
                    build(*args)
                except Exception:  # noqa: BLE001 - a tracing bug must not stop the tracing thread
                    log.exception("could not build spans")
                built += 1
                if built % 8 == 0:
                    # NOTE: give the GIL away now and then: a request thread would otherwise
                    # wait out the interpreter's 5 ms switch interval behind a long batch.
                    time.sleep(0)
                if len(self._batch) >= _EXPORT_BATCH:
                    self._export()
            self._export()

    def _export(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            self.exporter.export(batch)
        except Exception:  # noqa: BLE001 - an exporter's failure loses these spans, never a request
            log.exception("could not export %d spans", len(batch))

    def _finished(self, span: OpenSpan, end: int, error: str | None) -> None:
        status = Status(StatusCode.ERROR, error) if error else Status(StatusCode.UNSET)
        self._batch.append(ReadableSpan(span.name, span.context, span.parent, self._resource, span.attributes,
                                        (), (), span.kind, status=status, start_time=span.start, end_time=end,
                                        instrumentation_scope=self._scope))

    def _build(self, result: Any, stages: Mapping[str, float], end: int, parent: TraceParent | None) -> None:
        start = end - round(stages.get("total", 0.0) * _MS)
        if parent is None:  # no edge span (a library call): a new trace, sampled here
            trace_id = _ids.generate_trace_id()
            if not self._sampler.should_sample(None, trace_id, "ragserve.query").decision.is_sampled():
                return
            parent_sc = None
        else:
            trace_id, parent_sc = int(parent.trace_id, 16), _span_context(parent)
        links, leader = self._leader(result)
        root = self._emit("ragserve.query", trace_id, parent_sc, start, end,
                          query_attributes(result, leader, self.naming.capture_content), links=links)
        self._cache_span(root, result, stages, start)
        self._run_spans(root, result, stages, end, links, leader)

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

    def _emit(self, name: str, trace_id: int, parent: SpanContext | None, start: int, end: int,
              attributes: Mapping[str, Any], kind: SpanKind = SpanKind.INTERNAL,
              links: Sequence[Link] = ()) -> SpanContext:
        """One finished span into the batch being built (on the tracing thread)."""
        context = SpanContext(trace_id, _ids.generate_span_id(), is_remote=False, trace_flags=_SAMPLED)
        self._batch.append(ReadableSpan(name, context, parent, self._resource, attributes, (), links, kind,
                                        start_time=start, end_time=end, instrumentation_scope=self._scope))
        return context

    def _child(self, parent: SpanContext, name: str, start: int, ms: float, attributes: Mapping[str, Any],
               kind: SpanKind = SpanKind.INTERNAL, links: Sequence[Link] = ()) -> int:
        end = start + round(ms * _MS)
        self._emit(name, parent.trace_id, parent, start, end, attributes, kind, links)
        return end

    def _cache_span(self, ctx: SpanContext, result: Any, stages: Mapping[str, float], start: int) -> None:
        ms = stages.get("cache_l1", 0.0) + stages.get("cache_l2", 0.0)
        if "cache_l1" not in stages and "cache_l2" not in stages:
            return  # the request did not read the cache
        hit = result.cache_tier in ("l1", "l2")
        tiers = [t for t in ("l1", "l2") if f"cache_{t}" in stages]
        self._child(ctx, "ragserve.cache.lookup", start, ms, {
            "ragserve.cache.tier": result.cache_tier, "ragserve.cache.hit": hit,
            "ragserve.cache.tiers_asked": tuple(tiers),
            "ragserve.cache.l1_ms": stages.get("cache_l1", 0.0),
            "ragserve.cache.l2_ms": stages.get("cache_l2", 0.0)})

    def _run_spans(self, ctx: SpanContext, result: Any, stages: Mapping[str, float], end: int,
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
            join_ms = (end - start) / _MS
            self._child(ctx, "ragserve.single_flight.join", start, join_ms, attributes, links=links)
            return
        t = end - round(sum(stages[s] for s in ran) * _MS)
        for stage in ran:
            name, client, attributes = self.naming.stage(stage, result, stages)
            kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
            t = self._child(ctx, name, t, stages[stage], attributes, kind)


def _span_context(p: TraceParent, remote: bool = False) -> SpanContext:
    return SpanContext(int(p.trace_id, 16), int(p.span_id, 16), is_remote=remote,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED if p.sampled else TraceFlags.DEFAULT))


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


def _version() -> str:
    from ragserve._version import __version__

    return __version__
