"""A request's spans, laid out from its note (``traces.Tracing`` queues one per request) on
the tracing thread: the layout in ``traces.py``'s docstring, one place, two outputs.

- To ragserve's own OTLP exporter (``otlp.OTLPExporter``, what ``[telemetry] traces =
  "otlp"`` makes): each span is written straight to its protobuf bytes
  (``otlpwire.span_fields``, the same function that encodes an SDK span), its constant
  attributes encoded once; no SDK span object is ever made. ``tests/test_tracing.py``
  checks that this decodes to the same message as the SDK spans of the same requests.
- To any other exporter (the SDK's ``InMemorySpanExporter`` in the tests, its console
  exporter, a user's own): the SDK's finished-span type, ``ReadableSpan``, built directly
  (no tracer, no sampler call, no per-span helper layers).

Both run once per sampled request, so they are written for speed (the overhead figures in
docs/observability.md). Imports OpenTelemetry at its top: only ``traces`` imports it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from ragserve.observe import otlpwire
from ragserve.observe.genai import Naming, query_attributes
from ragserve.observe.propagation import TraceParent
from ragserve.observe.timing import stage_layout
from ragserve.types import SpanRef

_MS = 1_000_000  # ns per ms
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_INTERNAL, _CLIENT = SpanKind.INTERNAL, SpanKind.CLIENT
random_bits = random.getrandbits  # the SDK's RandomIdGenerator's source, without its call layers
_tuple_new = tuple.__new__
# The miss path's stages in pipeline order, read from ``Timings`` (a new stage is a new span).
RUN_STAGES = tuple(s for s in stage_layout()[0] if not s.startswith("cache_"))
_SEMANTIC_STAGES = ("embed_wait", "embed")  # what a semantic hit ran before its lookup
_TIERS_ASKED = {(True, True): ("l1", "l2"), (True, False): ("l1",), (False, True): ("l2",),
                (False, False): ()}
Leader = Callable[[Any], tuple[Sequence[Link], "str | None"]]


class SpanBuilder:
    """Spans into ``batch`` (``take`` hands it over): SDK spans, or with ``encoded`` each
    span's OTLP bytes (``otlpwire.span_message``). ``sampled``: the sampling rule of a new
    trace (``Tracing._sampled``); ``leader``: a shared run's links and leader request id."""

    def __init__(self, resource: Any, scope: Any, naming: Naming, sampled: Callable[[int], bool],
                 leader: Leader, encoded: bool) -> None:
        self.resource, self.scope, self.naming = resource, scope, naming
        self._sampled, self._leader = sampled, leader
        self.batch: list[Any] = []
        self._stages = self._stage_table()
        # The stage table's constant attributes, encoded once (by the id of the shared
        # mapping, which the table keeps alive).
        self._constant = {id(a): otlpwire.attributes_field(a) for _, _, _, a in self._stages if a is not None}
        self.encoded = encoded
        self._emit = self._emit_encoded if encoded else self._emit_sdk

    def take(self) -> list[Any]:
        batch, self.batch = self.batch, []
        return batch

    def _emit_sdk(self, name: str, trace_id: int, span_id: int, parent: SpanContext | None,
                  attributes: Mapping[str, Any], links: Sequence[Link], kind: SpanKind, status: Status,
                  start: int, end: int) -> None:
        # the tuple ``SpanContext`` is, without its constructor's checks, which the ids here pass
        context = _tuple_new(SpanContext, (trace_id, span_id, False, SAMPLED, DEFAULT_TRACE_STATE, True))
        self.batch.append(ReadableSpan(name, context, parent, self.resource, attributes, (), links, kind,
                                       None, status, start, end, self.scope))

    def _emit_encoded(self, name: str, trace_id: int, span_id: int, parent: SpanContext | None,
                      attributes: Mapping[str, Any], links: Sequence[Link], kind: SpanKind, status: Status,
                      start: int, end: int) -> None:
        encoded = self._constant.get(id(attributes))
        if encoded is None:
            encoded = otlpwire.attributes_field(attributes)
        self.batch.append(otlpwire.span_message(otlpwire.span_fields(
            trace_id, span_id, parent, name, kind, start, end, encoded, links, status)))

    def edge(self, span: Any, end: int, error: str | None) -> None:
        """An edge's span (``traces.OpenSpan``: its context drawn at its start)."""
        status = Status(StatusCode.ERROR, error) if error else _UNSET
        c = span.context
        if not self.encoded:  # its own context object, as it was handed out
            self.batch.append(ReadableSpan(span.name, c, span.parent, self.resource, span.attributes, (), (),
                                           span.kind, None, status, span.start, end, self.scope))
        else:
            self._emit(span.name, c.trace_id, c.span_id, span.parent, span.attributes, (), span.kind, status,
                       span.start, end)

    def request(self, result: Any, stages: Mapping[str, float], end: int, parent: TraceParent | None) -> None:
        """One request's spans, straight into the batch, the constant names and attributes
        made once in ``_stage_table``."""
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
                trace_id = trace_id_draw()
                if not self._sampled(trace_id):
                    return
            parent_sc = None
        else:
            trace_id, parent_sc = int(parent.trace_id, 16), span_context(parent)
            if generation is not None and generation[0] != trace_id:
                generation = None
        links, leader = self._leader(result) if shared else ((), None)
        emit = self._emit
        root_id = span_id_draw()
        root = _tuple_new(SpanContext, (trace_id, root_id, False, SAMPLED, DEFAULT_TRACE_STATE, True))
        attributes = query_attributes(result, leader, self.naming.capture_content)
        emit("ragserve.query", trace_id, root_id, parent_sc, attributes, links, _INTERNAL, _UNSET, start, end)
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
            attributes = {"ragserve.cache.tier": tier, "ragserve.cache.hit": exact,
                                          "ragserve.cache.tiers_asked": asked, "ragserve.cache.l1_ms": l1,
                                          "ragserve.cache.l2_ms": l2}
            emit("ragserve.cache.lookup", trace_id, span_id_draw(), root, attributes,
                 hit_links if exact else (), _INTERNAL, _UNSET, start, t)
        if tier != "miss":
            if tier == "semantic":
                self._semantic(result, stages, trace_id, root, t, hit_links)
            return
        if shared:  # the run is the leader's, in the leader's trace: here, the wait for it
            attributes = {f"ragserve.run.{s}_ms": ms for s in RUN_STAGES if (ms := get(s)) is not None}
            if not attributes:
                return
            if leader is not None:
                attributes["ragserve.single_flight.leader"] = leader
            emit("ragserve.single_flight.join", trace_id, span_id_draw(), root, attributes, links, _INTERNAL,
                 _UNSET, t, end)
            return
        # The run's stages end where the request ends, back to back, in pipeline order.
        ran = [(entry, round(ms * _MS)) for entry in self._stages if (ms := get(entry[0])) is not None]
        t = end
        for _, ns in ran:
            t -= ns
        for (stage, name, kind, attributes), ns in ran:
            span_id = random_bits(64) or 1  # span_id_draw, inline: once per span of every request
            if attributes is None:  # made per request: the retrieval's and the chat's
                name, client, attributes = self.naming.stage(stage, result, stages)
                kind = _CLIENT if client else _INTERNAL
                if stage == "generate" and generation is not None:
                    span_id = generation[1]
            t1 = t + ns
            emit(name, trace_id, span_id, root, attributes, (), kind, _UNSET, t, t1)
            t = t1

    def _stage_table(self) -> tuple[tuple[str, str, SpanKind, Mapping[str, Any] | None], ...]:
        """Per stage of the miss path, in order: its span's name, kind and attributes when
        they are constant (``genai.Naming.constant``), made once and shared by every span
        (read-only: ``ReadableSpan.attributes`` is a read-only view); None: per request."""
        table = []
        for s in RUN_STAGES:
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
        emit = self._emit
        for stage, name, _, attributes in self._stages:
            ms = stages.get(stage) if stage in _SEMANTIC_STAGES else None
            if ms is not None:
                t1 = t + round(ms * _MS)
                emit(name, trace_id, span_id_draw(), root, attributes, (), _INTERNAL, _UNSET, t, t1)
                t = t1
        attributes = {"ragserve.cache.tier": "semantic", "ragserve.cache.hit": True,
                      "ragserve.cache.semantic.similarity": result.semantic_similarity}
        if self.naming.capture_content and result.semantic_match is not None:
            attributes["ragserve.cache.semantic.match"] = result.semantic_match
        t1 = t + round(stages.get("cache_semantic", 0.0) * _MS)
        emit("ragserve.cache.semantic", trace_id, span_id_draw(), root, attributes, links, _INTERNAL, _UNSET,
             t, t1)


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
    context = _tuple_new(SpanContext, (ids[0], ids[1], True, SAMPLED, DEFAULT_TRACE_STATE, True))
    return [Link(context, {"ragserve.link": "cache.origin", "ragserve.cache.tier": tier})]


def trace_id_draw() -> int:
    return random_bits(128) or 1  # never the invalid 0 (the SDK draws again; 1 in 2**128)


def span_id_draw() -> int:
    return random_bits(64) or 1


def span_context(p: TraceParent, remote: bool = False) -> SpanContext:
    return SpanContext(int(p.trace_id, 16), int(p.span_id, 16), is_remote=remote,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED if p.sampled else TraceFlags.DEFAULT))
