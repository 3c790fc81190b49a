"""``[telemetry]``: OpenTelemetry traces of every request (off by default, free when off).

None of it changes an answer (it is not in the fingerprint).

**Usage:**

    cfg = RAGConfig().replace(telemetry={"traces": "otlp", "endpoint": "http://collector:4318/v1/traces"})

or ``RAGSERVE_TELEMETRY_TRACES=otlp``, or a ``[telemetry]`` table in the TOML, or the
standard ``OTEL_TRACES_EXPORTER=otlp`` (with ``OTEL_EXPORTER_OTLP_ENDPOINT`` and the other
``OTEL_EXPORTER_OTLP_*`` variables, which the OTLP exporter reads itself).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from ragserve.errors import ConfigError

TraceExport = Literal["off", "otlp", "console"]


@dataclass(frozen=True)
class TelemetryConfig:
    """Traces of requests: one trace per request, its spans built from the ``Timings``
    every result carries (docs/observability.md)."""

    traces: str = "off"
    """"off": no tracing, and no OpenTelemetry import at all. "otlp": OTLP/HTTP protobuf to
    ``endpoint``. "console": spans printed as JSON on stdout (debugging). With "off", the
    standard ``OTEL_TRACES_EXPORTER`` (``otlp`` / ``console``) turns tracing on too."""
    endpoint: str = ""
    """The OTLP/HTTP traces URL (e.g. ``http://127.0.0.1:4318/v1/traces``); "" lets the
    exporter read ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``
    (default ``http://localhost:4318/v1/traces``)."""
    sample_ratio: float = 1.0
    """The share of new traces recorded (0..1). A request whose caller's ``traceparent``
    says sampled or not follows the caller's decision (parent-based sampling)."""
    capture_content: bool = False
    """Record the question, the answer and the sources' text on the spans. Off by default:
    traces often go where the data may not."""
    service_name: str = ""
    """``service.name`` of the spans; "" reads ``OTEL_SERVICE_NAME``, else "ragserve"."""


def trace_export(t: TelemetryConfig, env: Mapping[str, str] | None = None) -> str:
    """Where spans go: ``t.traces``, or, when it is "off", ``OTEL_TRACES_EXPORTER``."""
    if t.traces != "off":
        return t.traces
    value = (os.environ if env is None else env).get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return value if value in ("otlp", "console") else "off"


def validate_telemetry(t: TelemetryConfig) -> None:
    allowed = get_args(TraceExport)
    if t.traces not in allowed:
        raise ConfigError("telemetry.traces",
                          f"must be one of {', '.join(map(repr, allowed))}, got {t.traces!r}")
    if not 0.0 <= t.sample_ratio <= 1.0:
        raise ConfigError("telemetry.sample_ratio", f"must be in 0..1, got {t.sample_ratio}")
    if t.endpoint and not t.endpoint.startswith(("http://", "https://")):
        raise ConfigError("telemetry.endpoint", f"must be an http:// or https:// URL, got {t.endpoint!r}")
