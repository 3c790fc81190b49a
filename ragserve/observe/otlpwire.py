"""The protobuf wire format of OTLP spans, written straight to bytes (``otlp.py`` gathers
them into requests and sends them).

``span_fields`` writes one ``Span`` message's fields in the order the SDK's encoder writes
them: from an SDK span (``_span``, what ``otlp.encode_spans`` and ``OTLPExporter.export``
encode) and from ragserve's own spans' parts (``spanbuild.py``, which never makes SDK spans
for ``OTLPExporter``), so both are the same bytes. What repeats from span to span (attribute
keys, string/bool/int attribute fields, names, kinds, an unset status, flags) is written
once. ``tests/test_tracing.py`` decodes the output with the proto package and checks it
equals the SDK encoder's, message for message.

Imported only when tracing is on.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, Status, StatusCode

log = logging.getLogger("ragserve.tracing")

# Wire types and the OTLP kinds (opentelemetry/proto/trace/v1/trace.proto).
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3, SpanKind.PRODUCER: 4,
         SpanKind.CONSUMER: 5}
_STATUS = {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags
_double = struct.Struct("<d").pack
_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_start_end = struct.Struct("<BQBQ").pack


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 as protobuf writes it: two's complement, ten bytes
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


_LEN_TAG = [_tag(f, _LEN) for f in range(17)]


def _len(field: int, payload: bytes) -> bytes:
    n = len(payload)
    return _LEN_TAG[field] + (_SMALL[n] if n < 0x80 else _varint(n)) + payload


# Tags used on every span, computed once.
_T = {name: _tag(f, w) for name, f, w in (
    ("trace_id", 1, _LEN), ("span_id", 2, _LEN), ("trace_state", 3, _LEN), ("parent", 4, _LEN),
    ("name", 5, _LEN), ("kind", 6, _VARINT), ("start", 7, _I64), ("end", 8, _I64), ("attr", 9, _LEN),
    ("dropped_attrs", 10, _VARINT), ("event", 11, _LEN), ("dropped_events", 12, _VARINT),
    ("link", 13, _LEN), ("dropped_links", 14, _VARINT), ("status", 15, _LEN), ("flags", 16, _I32))}
_ID16, _ID8 = _T["trace_id"] + _varint(16), _T["span_id"] + _varint(8)


def _value(v: Any) -> bytes:
    """An ``AnyValue``'s payload, as the SDK's ``_encode_value`` chooses its field."""
    encode = _BY_TYPE.get(type(v))
    if encode is not None:
        return encode(v)
    if v is None:
        return b""
    if v is True or v is False:
        return b"\x10" + _SMALL[int(v)]
    if isinstance(v, str):
        return _len(1, v.encode())
    if isinstance(v, int):
        return b"\x18" + _varint(int(v))
    if isinstance(v, float):
        return b"\x21" + _double(v)
    if isinstance(v, bytes):
        return _len(7, v)
    if isinstance(v, Sequence):
        return _len(5, b"".join(_len(1, _value(x)) for x in v))
    if isinstance(v, Mapping):
        return _len(6, b"".join(_len(1, _key_value(str(k), x)) for k, x in v.items()))
    raise TypeError(f"an OTLP attribute value cannot be a {type(v).__name__}: {v!r}")


_BY_TYPE = {str: lambda v: _len(1, v.encode()), float: lambda v: b"\x21" + _double(v),
            int: lambda v: b"\x18" + _varint(v), bool: lambda v: b"\x10" + _SMALL[v]}
_keys: dict[str, bytes] = {}  # attribute keys, encoded: a span's keys are nearly always the same few


def _key_value(key: str, value: Any) -> bytes:
    kind = type(value)
    if kind is str or kind is bool:  # mostly the same few pairs (a tier, a model): made once
        pair = _pairs.get((key, value))
        if pair is not None:
            return pair
    k = _keys.get(key)
    if k is None:
        k = _len(1, key.encode()) if key else b""
        if len(_keys) < 4096:
            _keys[key] = k
    # NOTE: the common types inline (this runs for every attribute of every span); the rest
    # as ``_value`` chooses, which these agree with.
    if kind is str:
        data = value.encode()
        n = len(data)
        v = b"\x0a" + (_SMALL[n] if n < 0x80 else _varint(n)) + data
    elif kind is float:
        v = b"\x21" + _double(value)
    elif kind is bool:
        v = _TRUE if value else _FALSE
    elif kind is int:
        v = b"\x18" + (_SMALL[value] if 0 <= value < 0x80 else _varint(value))
    elif kind is tuple or kind is list:
        v = _len(5, b"".join([_len(1, _value(x)) for x in value]))
    else:
        v = _value(value)
    n = len(v)
    pair = k + b"\x12" + (_SMALL[n] if n < 0x80 else _varint(n)) + v
    if kind is str or kind is bool:
        if len(_pairs) >= 4096:  # a request id each request: start again rather than keep them
            _pairs.clear()
        _pairs[(key, value)] = pair
    return pair


_pairs: dict[tuple[str, Any], bytes] = {}
_TRUE, _FALSE = b"\x10\x01", b"\x10\x00"


def _attributes(field: int, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    tag = _LEN_TAG[field]
    out = []
    for k, v in attributes.items():
        try:
            kv = _key_value(k, v)
        except Exception:  # noqa: BLE001 - as the SDK's encoder: that attribute is left out, logged
            log.exception("could not encode the span attribute %s", k)
            continue
        n = len(kv)
        out += (tag, _SMALL[n] if n < 0x80 else _varint(n), kv)
    return b"".join(out)


def _count(field: int, n: int) -> bytes:
    return _tag(field, _VARINT) + _varint(n) if n else b""


def _span(s: ReadableSpan) -> bytes:
    c = s.context
    trace_state = b""
    if c.trace_state:
        trace_state = _T["trace_state"] + _varint_len(",".join(f"{k}={v}" for k, v in c.trace_state.items()))
    events = []
    for e in s.events:
        body = ((_tag(1, _I64) + _fixed64(e.timestamp) if e.timestamp else b"")
                + (_len(2, e.name.encode()) if e.name else b"") + _attributes(3, e.attributes)
                + _count(4, e.dropped_attributes))
        events.append(_len(11, body))
    return span_fields(c.trace_id, c.span_id, s.parent, s.name, s.kind, s.start_time, s.end_time,
                       _attributes(9, s.attributes), s.links, s.status, trace_state,
                       _count(10, s.dropped_attributes) + b"".join(events) + _count(12, s.dropped_events),
                       _count(14, s.dropped_links))


def span_fields(trace_id: int, span_id: int, parent: Any, name: str, kind: SpanKind, start: int, end: int,
                attributes: bytes, links: Sequence[Any], status: Status | None, trace_state: bytes = b"",
                after_attributes: bytes = b"", after_links: bytes = b"") -> bytes:
    """A ``Span`` message's fields, in the order the SDK's encoder writes them, from a span's
    parts: ``_span`` (an SDK span) and ``spanbuild`` (ragserve's spans, never built as SDK
    objects when the exporter is ``OTLPExporter``) both write through here. ``attributes``
    encoded (``attributes_field``); ``parent`` a ``SpanContext`` or None; ``links`` the SDK's
    ``Link``; ``trace_state``, ``after_attributes`` (dropped attributes, events, dropped
    events) and ``after_links`` (dropped links) already encoded, empty for ragserve's spans."""
    out = [_ID16, trace_id.to_bytes(16, "big"), _ID8, span_id.to_bytes(8, "big"), trace_state]
    if parent:
        out += (_PARENT8, parent.span_id.to_bytes(8, "big"))
    if name:
        encoded = _names.get(name)
        if encoded is None:
            encoded = _T["name"] + _varint_len(name)
            if len(_names) < 4096:
                _names[name] = encoded
        out.append(encoded)
    out.append(_INTERNAL_FIELD if kind is _INTERNAL else _KIND_FIELD.get(kind, b""))
    if start and end:
        out.append(_start_end(0x39, start, 0x41, end))  # fields 7 and 8, fixed64
    else:
        if start:
            out += (_START, _fixed64(start))
        if end:
            out += (_END, _fixed64(end))
    out += (attributes, after_attributes)
    for link in links:
        lc = link.context
        flags = _HAS_IS_REMOTE | (_IS_REMOTE if lc.is_remote else 0)
        body = (b"\x0a\x10" + lc.trace_id.to_bytes(16, "big") + b"\x12\x08" + lc.span_id.to_bytes(8, "big")
                + _attributes(4, link.attributes) + _count(5, link.dropped_attributes)
                + _tag(6, _I32) + _fixed32(flags))
        out.append(_len(13, body))
    out.append(after_links)
    if status is not None:
        out.append(_UNSET_STATUS if status.status_code is StatusCode.UNSET and not status.description
                   else _status(status))
    out.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(out)


# What ``span_fields`` writes the same on many spans, made once.
_names: dict[str, bytes] = {}
_PARENT8, _START, _END = _T["parent"] + b"\x08", _T["start"], _T["end"]
_KIND_FIELD = {k: _T["kind"] + _SMALL[code] for k, code in _KIND.items()}
_INTERNAL = SpanKind.INTERNAL
_INTERNAL_FIELD = _KIND_FIELD[_INTERNAL]
_FLAGS_LOCAL = _T["flags"] + _fixed32(_HAS_IS_REMOTE)
_FLAGS_REMOTE = _T["flags"] + _fixed32(_HAS_IS_REMOTE | _IS_REMOTE)


def _status(status: Status) -> bytes:
    code = _STATUS[status.status_code]
    body = (_len(2, status.description.encode()) if status.description else b"") + \
        (b"\x18" + _SMALL[code] if code else b"")
    return _T["status"] + _varint(len(body)) + body


_UNSET_STATUS = _T["status"] + b"\x00"


def span_message(fields: bytes) -> bytes:
    """A ``Span`` as it sits in its ``ScopeSpans`` (what ``Payload.add_encoded`` takes)."""
    return _len(2, fields)


def attributes_field(attributes: Mapping[str, Any] | None) -> bytes:
    """A span's attributes, encoded (for ``span_fields``): as ``_attributes(9, ...)`` writes
    them, each string, bool or int pair's whole field made once (most are the same few: a
    tier, a model, an operation) and kept while there are at most 4,096."""
    if not attributes:
        return b""
    out = []
    fields = _fields
    for k, v in attributes.items():
        kind = type(v)
        cached = kind is str or kind is bool or kind is int
        if cached:
            field = fields.get((k, kind, v))  # the type in the key: True == 1, written differently
            if field is not None:
                out.append(field)
                continue
        try:
            kv = _key_value(k, v)
        except Exception:  # noqa: BLE001 - as ``_attributes``: that attribute is left out, logged
            log.exception("could not encode the span attribute %s", k)
            continue
        n = len(kv)
        field = b"\x4a" + (_SMALL[n] if n < 0x80 else _varint(n)) + kv  # field 9, length-delimited
        if cached:
            if len(fields) >= 4096:  # a request id each request: start again, not keep them
                fields.clear()
            fields[(k, kind, v)] = field
        out.append(field)
    return b"".join(out)


_fields: dict[tuple[str, type, Any], bytes] = {}


def _varint_len(text: str) -> bytes:
    data = text.encode()
    return _varint(len(data)) + data
