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
import random
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from ragserve.observe.genai import Naming, query_attributes
from ragserve.observe.propagation import TraceParent, bind, context_for, unbind
from ragserve.observe.timing import stage_layout
from ragserve.types import SpanRef

log = logging.getLogger("ragserve.tracing")
_MS = 1_000_000  # ns per ms
_SCHEMA = "https://opentelemetry.io/schemas/1.45.0"
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_INTERNAL, _CLIENT = SpanKind.INTERNAL, SpanKind.CLIENT
_random_bits = random.getrandbits  # the SDK's RandomIdGenerator's source, without its call layers
_tuple_new = tuple.__new__
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
# The miss path's stages in pipeline order, read from ``Timings`` (a new stage is a new span).
_RUN_STAGES = tuple(s for s in stage_layout()[0] if not s.startswith("cache_"))
_SEMANTIC_STAGES = ("embed_wait", "embed")  # what a semantic hit ran before its lookup


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
        # Parent-based, else the ratio (the SDK's ``ParentBased(TraceIdRatioBased)``: the low
        # 64 bits of the trace id under the bound), decided here with no sampler call per trace.
        self._bound = TraceIdRatioBased.get_bound_for_rate(sample_ratio)
        self._scope = InstrumentationScope("ragserve", _version(), _SCHEMA)
        self.naming = Naming(capture_content, embed_model, backend, top_k)
        self._stages = self._stage_table()
        self.dropped = 0
        self._leaders: OrderedDict[int, tuple[weakref.ref[Any], str, TraceParent | None]] = OrderedDict()
        self._lock = threading.Lock()
        # One flat tuple per note (what GC walks while it waits): an edge's (span, end,
        # error), a request's (result, stages, end, parent).
        self._pending: deque[tuple[Any, ...]] = deque()
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
        ``_build`` gives it that id): the pipeline keeps it with the answer
        (``result.origin_span``), in the cache too, so that later hits link to it. None when
        the leader's trace is not recorded."""
        usage = result.usage  # the one object every request's copy of this run shares
        context = context_for(result.request_id)
        with self._lock:
            self._leaders[id(usage)] = (weakref.ref(usage), result.request_id, context)
            while len(self._leaders) > 4096:
                self._leaders.popitem(last=False)
        if context is None:  # a library call: its trace starts here, sampled as in ``_build``
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
            pending, build, finished = self._pending, self._build, self._finished
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
                if len(self._batch) >= _EXPORT_BATCH:
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
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            self.exporter.export(batch)
        except Exception:  # noqa: BLE001 - an exporter's failure loses these spans, never a request
            log.exception("could not export %d spans", len(batch))

    def _finished(self, span: OpenSpan, end: int, error: str | None) -> None:
        status = Status(StatusCode.ERROR, error) if error else _UNSET
        self._batch.append(ReadableSpan(span.name, span.context, span.parent, self._resource, span.attributes,
                                        (), (), span.kind, None, status, span.start, end, self._scope))

    def _build(self, result: Any, stages: Mapping[str, float], end: int, parent: TraceParent | None) -> None:
        """One request's spans, straight into the batch: the SDK's finished-span type built
        directly (no tracer, no sampler call, no per-span helper layers, the constant names
        and attributes made once in ``_stage_table``); this runs once per sampled request, so
        it is written for speed (the overhead figures in docs/observability.md)."""
        get = stages.get
        start = end - round(get("total", 0.0) * _MS)
        tier, shared, origin = result.cache_tier, result.shared, result.origin_span
        # A run's leader drew its trace and the id of its generation's span in
        # ``on_generation`` (a hit elsewhere may already link to it): use them.
        generation = _ids(origin) if origin is not None and tier == "miss" and not shared else None
        if parent is None:  # no edge span (a library call): a new trace, sampled here
            if generation is not None:
                trace_id = generation[0]  # sampled when it was drawn
            else:
                trace_id = _trace_id()
                if not self._sampled(trace_id):
                    return
            parent_sc = None
        else:
            trace_id, parent_sc = int(parent.trace_id, 16), _span_context(parent)
            if generation is not None and generation[0] != trace_id:
                generation = None
        links, leader = self._leader(result) if shared else ((), None)
        resource, scope, out = self._resource, self._scope, self._batch.append
        root = _sampled_context(trace_id)
        out(ReadableSpan("ragserve.query", root, parent_sc, resource,
                         query_attributes(result, leader, self.naming.capture_content), (), links, _INTERNAL,
                         None, _UNSET, start, end, scope))
        hit_links: Sequence[Link] = ()
        if origin is not None and tier != "miss":  # a hit: the span that generated its answer
            hit_links = _origin_links(origin, tier)
        l1, l2 = get("cache_l1"), get("cache_l2")
        t = start
        if l1 is not None or l2 is not None:  # else the request did not read the cache
            asked = _TIERS_ASKED[(l1 is not None, l2 is not None)]
            l1, l2 = l1 or 0.0, l2 or 0.0
            t = start + round((l1 + l2) * _MS)
            exact = tier == "l1" or tier == "l2"
            attributes: dict[str, Any] = {"ragserve.cache.tier": tier, "ragserve.cache.hit": exact,
                                          "ragserve.cache.tiers_asked": asked, "ragserve.cache.l1_ms": l1,
                                          "ragserve.cache.l2_ms": l2}
            out(ReadableSpan("ragserve.cache.lookup", _sampled_context(trace_id), root, resource, attributes,
                             (), hit_links if exact else (), _INTERNAL, None, _UNSET, start, t, scope))
        if tier != "miss":
            if tier == "semantic":
                self._semantic(result, stages, trace_id, root, t, hit_links)
            return
        if shared:  # the run is the leader's, in the leader's trace: here, the wait for it
            attributes = {f"ragserve.run.{s}_ms": ms for s in _RUN_STAGES if (ms := get(s)) is not None}
            if not attributes:
                return
            if leader is not None:
                attributes["ragserve.single_flight.leader"] = leader
            out(ReadableSpan("ragserve.single_flight.join", _sampled_context(trace_id), root, resource,
                             attributes, (), links, _INTERNAL, None, _UNSET, t, end, scope))
            return
        # The run's stages end where the request ends, back to back, in pipeline order.
        ran = [(entry, round(ms * _MS)) for entry in self._stages if (ms := get(entry[0])) is not None]
        t = end
        for _, ns in ran:
            t -= ns
        for (stage, name, kind, attributes), ns in ran:
            span_id = _random_bits(64) or 1
            if attributes is None:  # made per request: the retrieval's and the chat's
                name, client, attributes = self.naming.stage(stage, result, stages)
                kind = _CLIENT if client else _INTERNAL
                if stage == "generate" and generation is not None:
                    span_id = generation[1]
            context = _tuple_new(SpanContext, (trace_id, span_id, False, _SAMPLED, DEFAULT_TRACE_STATE, True))
            t1 = t + ns
            out(ReadableSpan(name, context, root, resource, attributes, (), (), kind, None, _UNSET, t, t1,
                             scope))
            t = t1

    def _stage_table(self) -> tuple[tuple[str, str, SpanKind, Mapping[str, Any] | None], ...]:
        """Per stage of the miss path, in order: its span's name, kind and attributes when
        they are constant (``genai.Naming.constant``), made once and shared by every span
        (read-only: ``ReadableSpan.attributes`` is a read-only view); None: per request."""
        table = []
        for s in _RUN_STAGES:
            constant = self.naming.constant(s)
            if constant is None:
                table.append((s, "", _INTERNAL, None))
            else:
                name, client, attributes = constant
                table.append((s, name, _CLIENT if client else _INTERNAL, MappingProxyType(attributes)))
        return tuple(table)

    def _semantic(self, result: Any, stages: Mapping[str, float], trace_id: int, root: SpanContext, t: int,
                  links: Sequence[Link]) -> None:
        """A semantic hit's spans after its exact lookup, back to back: the question's
        embedding (its wait, then the model) and the semantic tier's lookup, which found the
        answer (and links to the span that generated it)."""
        out, resource, scope = self._batch.append, self._resource, self._scope
        for stage, name, _, attributes in self._stages:
            ms = stages.get(stage) if stage in _SEMANTIC_STAGES else None
            if ms is not None:
                t1 = t + round(ms * _MS)
                out(ReadableSpan(name, _sampled_context(trace_id), root, resource, attributes, (), (),
                                 _INTERNAL, None, _UNSET, t, t1, scope))
                t = t1
        attributes = {"ragserve.cache.tier": "semantic", "ragserve.cache.hit": True,
                      "ragserve.cache.semantic.similarity": result.semantic_similarity}
        if self.naming.capture_content and result.semantic_match is not None:
            attributes["ragserve.cache.semantic.match"] = result.semantic_match
        t1 = t + round(stages.get("cache_semantic", 0.0) * _MS)
        out(ReadableSpan("ragserve.cache.semantic", _sampled_context(trace_id), root, resource, attributes,
                         (), links, _INTERNAL, None, _UNSET, t, t1, scope))

    def _leader(self, result: Any) -> tuple[Sequence[Link], str | None]:
        with self._lock:
            entry = self._leaders.get(id(result.usage))
        if entry is None or entry[0]() is not result.usage:
            return (), None
        _, leader_id, context = entry
        if context is None:
            return (), leader_id
        return [Link(_span_context(context), {"ragserve.link": "single_flight.leader"})], leader_id


_TIERS_ASKED = {(True, True): ("l1", "l2"), (True, False): ("l1",), (False, True): ("l2",),
                (False, False): ()}


def _ids(ref: SpanRef) -> tuple[int, int] | None:
    """A ``SpanRef``'s ids as ints, or None when they are not a valid W3C trace and span id
    (a record that says otherwise names no span: no link, never a failed build)."""
    try:
        trace_id, span_id = int(ref.trace_id, 16), int(ref.span_id, 16)
    except (TypeError, ValueError):
        return None
    if not (0 < trace_id < 1 << 128 and 0 < span_id < 1 << 64):
        return None
    return trace_id, span_id


def _origin_links(ref: SpanRef, tier: str) -> Sequence[Link]:
    """A hit's link to the span that generated the answer it served."""
    ids = _ids(ref)
    if ids is None:
        return ()
    context = _tuple_new(SpanContext, (ids[0], ids[1], True, _SAMPLED, DEFAULT_TRACE_STATE, True))
    return [Link(context, {"ragserve.link": "cache.origin", "ragserve.cache.tier": tier})]


def _trace_id() -> int:
    return _random_bits(128) or 1  # never the invalid 0 (the SDK draws again; 1 in 2**128)


def _span_id() -> int:
    return _random_bits(64) or 1


def _sampled_context(trace_id: int) -> SpanContext:
    """A new span's context in ``trace_id`` (sampled, no trace state): the tuple
    ``SpanContext`` is, without its constructor's checks, which the ids here always pass."""
    return _tuple_new(SpanContext, (trace_id, _span_id(), False, _SAMPLED, DEFAULT_TRACE_STATE, True))


def _span_context(p: TraceParent, remote: bool = False) -> SpanContext:
    return SpanContext(int(p.trace_id, 16), int(p.span_id, 16), is_remote=remote,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED if p.sampled else TraceFlags.DEFAULT))


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
