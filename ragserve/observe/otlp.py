"""OTLP/HTTP export of spans, with the protobuf payload written straight to bytes.

The SDK's OTLP exporter builds a generated protobuf object for every span, attribute and
value, then serializes them: about 45 µs of CPU per span on a 2-core EPYC, ~0.4 ms per
request at 9 spans a request, paid on the tracing thread while it holds the GIL: more than
everything else tracing costs together. ``encode_spans`` writes the same
``ExportTraceServiceRequest`` (opentelemetry-proto's ``trace/v1``) field by field in the
protobuf wire format instead (``otlpwire.py``); ``tests/test_tracing.py`` decodes its output
with the proto package and checks it equals the SDK encoder's, message for message.

``OTLPExporter`` is the SDK's ``OTLPSpanExporter`` (endpoint, headers, TLS, compression,
timeouts, retries: all the SDK's, from its arguments and the ``OTEL_EXPORTER_OTLP_*``
variables) with this encoder.

Imported only when tracing is on (``traces.make_exporter``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from ragserve.observe.otlpwire import _attributes, _len, _span

log = logging.getLogger("ragserve.tracing")

def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """An OTLP ``ExportTraceServiceRequest`` of ``spans``, serialized (``Payload``)."""
    payload = Payload()
    payload.add(spans)
    return payload.serialize()


class Payload:
    """An ``ExportTraceServiceRequest`` being written: each span is encoded when it is added
    (so the caller can let go of it at once), grouped by resource, then by instrumentation
    scope, in order of first appearance, as the SDK's encoder groups them (which hashes each
    span's resource: here, objects already seen are found by identity, which the groups keep
    alive, and a new one is compared with the few groups there are)."""

    def __init__(self) -> None:
        self.spans = 0
        self._groups: list[tuple[Any, list[tuple[Any, list[bytes]]]]] = []
        self._by_resource: dict[int, tuple[Any, list[tuple[Any, list[bytes]]]]] = {}
        self._by_scope: dict[tuple[int, int], list[bytes]] = {}

    def add(self, spans: Sequence[ReadableSpan]) -> None:
        """Encode ``spans`` into the payload; all or none (an error leaves it as it was)."""
        encoded_spans = [(s.resource, s.instrumentation_scope or None, _len(2, _span(s))) for s in spans]
        group = self._group
        for resource, scope, data in encoded_spans:
            group(resource, scope).append(data)
        self.spans += len(encoded_spans)

    def add_encoded(self, resource: Any, scope: Any, spans: Sequence[bytes]) -> None:
        """Spans of one resource and scope, already encoded (``span_message``)."""
        self._group(resource, scope or None).extend(spans)
        self.spans += len(spans)

    def _group(self, resource: Any, scope: Any) -> list[bytes]:
        encoded = self._by_scope.get((id(resource), id(scope)))
        if encoded is None:
            groups = self._groups
            group = self._by_resource.get(id(resource))
            if group is None:
                group = next((g for g in groups if g[0] == resource), None) or (resource, [])
                if not any(g is group for g in groups):
                    groups.append(group)
                self._by_resource[id(resource)] = group
            encoded = next((e for sc, e in group[1] if sc == scope), None)
            if encoded is None:
                encoded = []
                group[1].append((scope, encoded))
            self._by_scope[(id(resource), id(scope))] = encoded
        return encoded

    def serialize(self) -> bytes:
        out = []
        for resource, scopes in self._groups:
            body = [_len(1, _attributes(1, resource.attributes))]
            for scope, encoded in scopes:
                head = b""
                if scope is not None:
                    head = ((_len(1, scope.name.encode()) if scope.name else b"")
                            + (_len(2, scope.version.encode()) if scope.version else b"")
                            + _attributes(3, scope.attributes))
                schema = _len(3, scope.schema_url.encode()) if scope is not None and scope.schema_url else b""
                body.append(_len(2, _len(1, head) + b"".join(encoded) + schema))
            if resource.schema_url:
                body.append(_len(3, resource.schema_url.encode()))
            out.append(_len(1, b"".join(body)))
        return b"".join(out)


class OTLPExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter, its payload written by ``Payload``.

    ``export`` encodes the spans it is given at once (the tracing thread hands them over in
    small batches, so they are freed before the garbage collector walks them again) and
    sends a request once ``send_at`` spans are waiting; ``force_flush`` (the tracing thread
    calls it at the end of each pass) and ``shutdown`` send what waits."""

    def __init__(self, *args: Any, send_at: int = 512, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.send_at = send_at
        self._payload = Payload()
        self._payload_lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            log.warning("the OTLP exporter is shut down: %d spans dropped", len(spans))
            return SpanExportResult.FAILURE
        with self._payload_lock:
            try:
                self._payload.add(spans)
            except Exception:  # noqa: BLE001 - a batch that cannot be encoded is lost, never the thread
                log.exception("could not encode %d spans", len(spans))
                return SpanExportResult.FAILURE
            if self._payload.spans < self.send_at:
                return SpanExportResult.SUCCESS
            return self._send()

    def export_encoded(self, resource: Any, scope: Any, spans: Sequence[bytes]) -> SpanExportResult:
        """``export`` for spans already encoded (``span_message``), all of ``resource`` and
        ``scope``: how ``traces.Tracing`` hands over its own spans, never built as SDK spans."""
        if self._shutdown:
            log.warning("the OTLP exporter is shut down: %d spans dropped", len(spans))
            return SpanExportResult.FAILURE
        with self._payload_lock:
            self._payload.add_encoded(resource, scope, spans)
            if self._payload.spans < self.send_at:
                return SpanExportResult.SUCCESS
            return self._send()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        with self._payload_lock:
            return self._send() is SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if not self._shutdown:
            self.force_flush()
        super().shutdown()

    def _send(self) -> SpanExportResult:
        payload, self._payload = self._payload, Payload()
        if not payload.spans:
            return SpanExportResult.SUCCESS
        data = payload.serialize()
        if 0 < self._max_request_size < len(data):
            log.warning("dropped %d spans: %d bytes is past the OTLP request limit of %d",
                        payload.spans, len(data), self._max_request_size)
            return SpanExportResult.FAILURE
        # NOTE: the SDK's own HTTP client (retries with backoff, compression, headers, TLS);
        # a private attribute of the pinned opentelemetry-exporter-otlp-proto-http, which the
        # OTLP receiver test in tests/test_tracing.py exercises.
        return SpanExportResult.SUCCESS if self._client.export(data).success else SpanExportResult.FAILURE
