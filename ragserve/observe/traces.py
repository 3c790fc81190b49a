"""OpenTelemetry traces of requests, built after the fact from the ``Timings`` each result
carries: one source of truth, no second clock (docs/observability.md).

``Tracing`` is a request observer (``observers.py``). When a request ends, its stage times
become spans under the request's own context (the HTTP server span that ``bind`` made
current for its request id, in ``propagation.py``), laid out on the wall clock:

    POST /v1/query                       (server span, ``server/tracing.py``)
    └─ ragserve.query                    total
       ├─ ragserve.cache.lookup          cache_l1 + cache_l2   (ragserve.cache.tier; a hit's link)
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

A hit links to the span that generated its answer: ``on_generation`` (a run's end) draws
the id the run's ``chat`` span gets and returns it; the pipeline keeps it with the answer
(``QueryResult.origin_span``, and in the cache ``CachedAnswer.origin``, L1 and L2), and an
L1/L2 hit's ``ragserve.cache.lookup`` span, or a semantic hit's ``ragserve.cache.semantic``
span (after its ``ragserve.embed_wait`` and ``embeddings`` spans), links to it
(``ragserve.link = "cache.origin"``). An answer generated untraced has no origin: no link.

The names and attributes are ``genai.py``'s: the OpenTelemetry GenAI semantic conventions
v0.1.0 where they have one. Content only with ``telemetry.capture_content``.

Every span here is made after the fact, never started and ended through an SDK tracer: a
request pays only a note in a queue (``on_result``, ``end``); the one tracing thread lays
out the spans (``spanbuild.py``, at most 0.1 s later) and exports them in batches: to
ragserve's OTLP exporter as protobuf bytes written straight from the note (no SDK span
object at all), to any other exporter as the SDK's finished-span type (``ReadableSpan``).
The sampling decision is taken once per trace, where it starts (a caller's ``traceparent``
flags, else ``sample_ratio``).

This module imports OpenTelemetry at its top: only ``make_tracing`` imports it, and only
when tracing is on.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

from ragserve.observe.genai import Naming
from ragserve.observe.propagation import TraceParent, bind, context_for, unbind
from ragserve.observe.spanbuild import SAMPLED as _SAMPLED
from ragserve.observe.spanbuild import SpanBuilder, span_context, span_id_draw, trace_id_draw
from ragserve.types import SpanRef

log = logging.getLogger("ragserve.tracing")
_SCHEMA = "https://opentelemetry.io/schemas/1.45.0"
_LOW_64 = TraceIdRatioBased.TRACE_ID_LIMIT
_YIELD_EVERY = 32  # requests built between two GIL hand-overs on the tracing thread
_WAKE_AT = 256  # notes pending before the tracing thread is woken early
_BUILD_EVERY_S = 0.1
_MAX_PENDING = 8_192  # past it (an exporter stuck in its retries) new notes are dropped and counted
# Spans handed to the exporter at a time: few, so that they are freed young, before the
# garbage collector has walked them more than once (512 here cost a fake miss ~10% more CPU
# with tracing on, 64 ~1-4%); ``otlp.OTLPExporter`` encodes each batch at once and sends one
# request per 512 spans or per pass of the tracing thread (its ``force_flush``).
_EXPORT_BATCH = 64
_trace_id, _span_id, _span_context = trace_id_draw, span_id_draw, span_context


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
        resource = Resource.create({"service.name": service})
        # Parent-based, else the ratio (the SDK's ``ParentBased(TraceIdRatioBased)``: the low
        # 64 bits of the trace id under the bound), decided here with no sampler call per trace.
        self._bound = TraceIdRatioBased.get_bound_for_rate(sample_ratio)
        self.naming = Naming(capture_content, embed_model, backend, top_k)
        # ragserve's own OTLP exporter takes the spans as protobuf bytes, written from the
        # notes (no SDK span is made); any other exporter is given SDK spans.
        self._encoded = callable(getattr(exporter, "export_encoded", None))
        scope = InstrumentationScope("ragserve", _version(), _SCHEMA)
        self._builder = SpanBuilder(resource, scope, self.naming, self._sampled, self._leader, self._encoded)
        self.dropped = 0
        self._leaders: OrderedDict[int, tuple[weakref.ref[Any], str, TraceParent | None]] = OrderedDict()
        self._lock = threading.Lock()
        # One flat tuple per note (what GC walks while it waits): an edge's (span, end,
        # error), a request's (result, stages, end, parent).
        self._pending: deque[tuple[Any, ...]] = deque()
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
            trace_id, parent_sc = _trace_id(), None
            sampled = self._sampled(trace_id)
        else:
            trace_id, sampled = int(parent.trace_id, 16), parent.sampled
            parent_sc = _span_context(parent, remote=True)
        flags = _SAMPLED if sampled else TraceFlags(TraceFlags.DEFAULT)
        context = SpanContext(trace_id, _span_id(), False, flags)
        return OpenSpan(name, context, parent_sc, attributes, start_ns, kind)

    def _sampled(self, trace_id: int) -> bool:
        """The one rule for a new trace (the SDK's ``TraceIdRatioBased``: its low 64 bits
        under the ratio's bound), wherever a root is drawn: an edge span, a library call's
        run, a library call's request."""
        return trace_id & _LOW_64 < self._bound

    def end(self, span: OpenSpan, end_ns: int, error: str | None = None) -> None:
        if span.context.trace_flags.sampled:
            self._note((span, end_ns, error))

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

    def on_generation(self, result: Any) -> SpanRef | None:
        """A run of the miss path ended: remember its leader, for the requests that share it,
        and name the span of its generation (the leader's ``chat`` span, its id drawn now,
        ``spanbuild`` gives it that id): the pipeline keeps it with the answer
        (``result.origin_span``), in the cache too, so that later hits link to it. None when
        the leader's trace is not recorded."""
        usage = result.usage  # the one object every request's copy of this run shares
        context = context_for(result.request_id)
        with self._lock:
            self._leaders[id(usage)] = (weakref.ref(usage), result.request_id, context)
            while len(self._leaders) > 4096:
                self._leaders.popitem(last=False)
        if context is None:  # a library call: its trace starts here, sampled as in ``spanbuild``
            trace_id = _trace_id()
            if not self._sampled(trace_id):
                return None
            return SpanRef(f"{trace_id:032x}", f"{_span_id():016x}")
        return SpanRef(context.trace_id, f"{_span_id():016x}") if context.sampled else None

    def on_result(self, result: Any, stages: Mapping[str, float]) -> None:
        """Note the request's end and context (its binding ends with it); its spans are
        built on the tracing thread."""
        parent = context_for(result.request_id)
        if parent is None or parent.sampled:
            self._note((result, stages, time.time_ns(), parent))

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

    def _note(self, note: tuple[Any, ...]) -> None:
        if len(self._pending) >= _MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(note)
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
            builder = self._builder
            pending, build, finished = self._pending, builder.request, builder.edge
            while pending:
                note = pending.popleft()
                try:
                    if len(note) == 4:
                        build(*note)
                    else:
                        finished(*note)
                except Exception:  # noqa: BLE001 - a tracing bug must not stop the tracing thread
                    log.exception("could not build spans")
                built += 1
                if built % _YIELD_EVERY == 0:
                    # NOTE: give the GIL away now and then: a request thread would otherwise
                    # wait out the interpreter's 5 ms switch interval behind a long batch.
                    time.sleep(0)
                if len(builder.batch) >= _EXPORT_BATCH:
                    self._export()
            self._export()
            if built:
                self._flush_exporter()

    def _flush_exporter(self) -> None:
        """The end of a pass: an exporter that gathers batches (``otlp.OTLPExporter``) sends
        them now."""
        try:
            self.exporter.force_flush()
        except Exception:  # noqa: BLE001 - as for an export
            log.exception("could not flush the exporter")

    def _export(self) -> None:
        builder = self._builder
        batch = builder.take()
        if not batch:
            return
        try:
            if self._encoded:
                self.exporter.export_encoded(builder.resource, builder.scope, batch)
            else:
                self.exporter.export(batch)
        except Exception:  # noqa: BLE001 - an exporter's failure loses these spans, never a request
            log.exception("could not export %d spans", len(batch))

    def _leader(self, result: Any) -> tuple[Sequence[Link], str | None]:
        with self._lock:
            entry = self._leaders.get(id(result.usage))
        if entry is None or entry[0]() is not result.usage:
            return (), None
        _, leader_id, context = entry
        if context is None:
            return (), leader_id
        return [Link(_span_context(context), {"ragserve.link": "single_flight.leader"})], leader_id


def make_exporter(kind: str, endpoint: str = "") -> SpanExporter:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from ragserve.observe.otlp import OTLPExporter  # the SDK's exporter, with an encoder ~10x cheaper

    return OTLPExporter(endpoint=endpoint) if endpoint else OTLPExporter()


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
