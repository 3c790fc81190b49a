"""The Prometheus exporter of ``ragserve serve``: a request observer (``observe/observers.py``).

It subscribes to the engine's observers, so it sees exactly what ``stats()`` sees and
never parses it. Names follow Prometheus conventions with a ``ragserve_`` prefix; stage
names are those of ``Timings``:

| metric | type | labels |
|---|---|---|
| ``ragserve_stage_duration_seconds`` | histogram | ``stage`` (``embed``, ``generate``, ..., ``total``) |
| ``ragserve_requests_total`` | counter | ``outcome`` (``ok``, ``error``, ``timeout``, ``cancelled``, ``overloaded``, ``invalid``) |
| ``ragserve_answers_total`` | counter | ``cache_tier`` (``l1``, ``l2``, ``miss``) |
| ``ragserve_partial_answers_total`` | counter | (answers without some shards: ``ray.allow_partial``) |
| ``ragserve_errors_total`` | counter | ``type`` (the error class) |
| ``ragserve_admission_rejections_total`` | counter | |
| ``ragserve_generated_tokens_total`` / ``ragserve_prompt_tokens_total`` | counter | (each generation once) |
| ``ragserve_in_flight``, ``ragserve_queued`` | gauge | |
| ``ragserve_retrievals_total``, ``ragserve_retrieval_rejections_total`` | counter | (``/v1/retrieve``, its own bounds) |
| ``ragserve_retrievals_in_flight``, ``ragserve_retrievals_queued`` | gauge | |
| ``ragserve_engine_unfinished_requests`` | gauge | |
| ``ragserve_l2_breaker_state`` | gauge (1 for the current state) | ``state`` |
| ``ragserve_semantic_lookups_total``, ``ragserve_semantic_hits_total`` | counter | (the semantic tier, when on) |
| ``ragserve_semantic_guarded_total`` | counter | ``reason`` (``negation``, ``question``, ``number``, ``entity``, ``content``) |
| ``ragserve_semantic_similarity`` | histogram | (cosine similarity of each served semantic hit) |
| ``ragserve_prefix_cache_queried_tokens_total``, ``ragserve_prefix_cache_hit_tokens_total`` | counter | (vLLM's prefix cache, when the backend counts it) |
| ``ragserve_http_refusals_total`` | counter | ``reason`` (``limits.REASONS``: ``headers_too_large``, ``header_timeout``, ``body_timeout``, ``invalid_request``, ``idle_closed``, ``evicted``, ``refused_full``, ``refused_busy``, ``send_timeout``) |
| ``ragserve_http_connections_open``, ``ragserve_http_connections_busy`` | gauge | |

The connection series come from the server's ``[server]`` limits (``limits.py``), and are
absent where the app runs without them (an ingress replica behind Ray Serve's proxy). Every
label value is one of a fixed set named here: none is taken from a request.

Each app has its own ``CollectorRegistry``: two servers in one process never collide.

**Exemplars.** With tracing on, each stage observation carries its request's trace id
(``{trace_id="..."}``) when that trace is recorded, so a slow bucket leads to a trace. They
are shown only in the OpenMetrics format, which a scraper asks for with
``Accept: application/openmetrics-text`` (Prometheus does; ``render(openmetrics=True)``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ragserve.cache.semantic import SIMILARITY_BUCKETS
from ragserve.errors import DeadlineExceededError, InputError, OverloadedError
from ragserve.observe.propagation import sampled_trace_id
from ragserve.server.limits import REASONS

# From 0.1 ms (an L1 hit) to 2 minutes (a long generation under load).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class PrometheusExporter:
    """**Usage:** ``exp = PrometheusExporter(rag); rag.observers.add(exp); exp.render()``

    ``connections``: returns the server's ``limits.ConnectionGuard`` (or None);
    ``exemplars``: put the trace id of each traced request on its stage observations."""

    def __init__(self, rag: Any, connections: Callable[[], Any] | None = None, *, exemplars: bool = False) -> None:
        self.exemplars = exemplars
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stages = Histogram("ragserve_stage_duration_seconds", "Time spent in each stage of a request",
                                ["stage"], buckets=BUCKETS, registry=r)
        self.requests = Counter("ragserve_requests", "Requests by outcome", ["outcome"], registry=r)
        self.answers = Counter("ragserve_answers", "Answered requests by the cache tier that answered",
                               ["cache_tier"], registry=r)
        self.partial = Counter("ragserve_partial_answers",
                               "Answers grounded without some shards of a sharded index (ray.allow_partial)",
                               registry=r)
        self.errors = Counter("ragserve_errors", "Failed requests by error type", ["type"], registry=r)
        self.rejections = Counter("ragserve_admission_rejections", "Requests refused at admission (429)",
                                  registry=r)
        self.completion_tokens = Counter("ragserve_generated_tokens", "Tokens generated (each run once)",
                                         registry=r)
        self.prompt_tokens = Counter("ragserve_prompt_tokens", "Prompt tokens sent to the engine (each run once)",
                                     registry=r)
        self.semantic_similarity = Histogram(
            "ragserve_semantic_similarity", "Cosine similarity of the questions whose semantic hits were served",
            buckets=SIMILARITY_BUCKETS, registry=r)
        r.register(_LiveGauges(rag))
        if connections is not None:
            r.register(_ConnectionSeries(connections))

    def on_result(self, result: Any, stages: Mapping[str, float]) -> None:
        trace_id = sampled_trace_id(result.request_id) if self.exemplars else None
        exemplar = {"trace_id": trace_id} if trace_id else None
        for stage, ms in stages.items():
            self.stages.labels(stage).observe(ms / 1e3, exemplar)
        self.requests.labels("ok").inc()
        self.answers.labels(result.cache_tier).inc()
        if result.missing_shards:
            self.partial.inc()
        if result.cache_tier == "semantic" and result.semantic_similarity is not None:
            self.semantic_similarity.observe(result.semantic_similarity)

    def on_generation(self, result: Any) -> None:
        self.completion_tokens.inc(result.usage.completion_tokens)
        self.prompt_tokens.inc(result.usage.prompt_tokens)

    def on_error(self, error: BaseException) -> None:
        outcome, rejected, error_type = error_series(error)
        self.requests.labels(outcome).inc()
        if rejected:
            self.rejections.inc()
        if error_type is not None:
            self.errors.labels(error_type).inc()

    def render(self, openmetrics: bool = False) -> bytes:
        """The text format, or OpenMetrics (with the exemplars) when ``openmetrics``."""
        if openmetrics:
            from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

            return openmetrics_latest(self.registry)
        return generate_latest(self.registry)


def error_series(error: BaseException) -> tuple[str, bool, str | None]:
    """What a failed request adds to the series: its outcome, whether admission refused it,
    and its error type (None for a cancellation, which is no error)."""
    cancelled = isinstance(error, asyncio.CancelledError)
    return outcome_of(error), isinstance(error, OverloadedError), None if cancelled else type(error).__name__


def outcome_of(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, DeadlineExceededError):
        return "timeout"
    if isinstance(error, OverloadedError):
        return "overloaded"
    if isinstance(error, InputError):
        return "invalid"
    return "error"


class _LiveGauges(Collector):
    """Gauges read at scrape time from the engine's public state."""

    def __init__(self, rag: Any) -> None:
        self.rag = rag

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        rag = self.rag
        for name, doc in (("in_flight", "Requests past L1 on the engine loop"),
                          ("queued", "Requests waiting for an admission slot")):
            yield GaugeMetricFamily(f"ragserve_{name}", doc, value=rag.gauges.value(name))
        retrievals = rag.retrievals  # retrieval-only requests: bounded apart from the queries above
        yield CounterMetricFamily("ragserve_retrievals", "Retrieval-only requests admitted",
                                  value=retrievals.admitted)
        yield CounterMetricFamily("ragserve_retrieval_rejections",
                                  "Retrieval-only requests refused past their bounds (429)", value=retrievals.rejected)
        yield GaugeMetricFamily("ragserve_retrievals_in_flight", "Retrieval-only requests running",
                                value=retrievals.in_flight)
        yield GaugeMetricFamily("ragserve_retrievals_queued", "Retrieval-only requests waiting for a slot",
                                value=retrievals.queued)
        unfinished = rag.engine_unfinished()
        if unfinished is not None:
            yield GaugeMetricFamily("ragserve_engine_unfinished_requests",
                                    "Requests the generation engine holds", value=unfinished)
        prefix = _prefix_cache(rag.generator)
        if prefix is not None:  # vLLM's prefix cache, token-weighted (the vllm backend counts it)
            yield CounterMetricFamily("ragserve_prefix_cache_queried_tokens",
                                      "Prompt tokens looked up in vLLM's prefix cache", value=prefix["queried_tokens"])
            yield CounterMetricFamily("ragserve_prefix_cache_hit_tokens",
                                      "Prompt tokens found in vLLM's prefix cache", value=prefix["hit_tokens"])
        l2 = rag.cache.l2 if rag.cache is not None else None
        if l2 is not None:
            g = GaugeMetricFamily("ragserve_l2_breaker_state", "L2 (Redis) circuit breaker: 1 for the current state",
                                  labels=["state"])
            for state in ("closed", "open", "half-open"):
                g.add_metric([state], 1.0 if l2.breaker.state == state else 0.0)
            yield g
        semantic = rag.cache.semantic if rag.cache is not None else None
        if semantic is not None:
            s = semantic.stats
            yield CounterMetricFamily("ragserve_semantic_lookups", "Semantic tier lookups", value=s.lookups)
            yield CounterMetricFamily("ragserve_semantic_hits", "Semantic tier hits served", value=s.hits)
            guarded = CounterMetricFamily("ragserve_semantic_guarded",
                                          "Semantic candidates above the threshold the guard refused",
                                          labels=["reason"])
            for reason in ("negation", "question", "number", "entity", "content"):
                guarded.add_metric([reason], s.guarded.get(reason, 0))
            yield guarded


class _ConnectionSeries(Collector):
    """What the connection limits refused or ended, read at scrape time from the guard."""

    def __init__(self, connections: Callable[[], Any]) -> None:
        self.connections = connections

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        guard = self.connections()
        if guard is None:
            return
        refusals = CounterMetricFamily("ragserve_http_refusals", "Connections refused or ended by a [server] "
                                       "limit (431, 408, 400, 503, closed, aborted), by reason", labels=["reason"])
        for reason in REASONS:
            refusals.add_metric([reason], guard.counts[reason])
        yield refusals
        live, idle = len(guard.live), len(guard.idle)
        yield GaugeMetricFamily("ragserve_http_connections_open", "Client connections open (server.max_connections)",
                                value=live)
        yield GaugeMetricFamily("ragserve_http_connections_busy", "Client connections with a request in progress",
                                value=live - idle)


def _prefix_cache(generator: Any) -> dict[str, Any] | None:
    """The prefix-cache counts of the generator's ``stats()`` (the vllm backend's, or the
    one a Ray generator replica reported), or None when it keeps none."""
    stats = getattr(generator, "stats", None)
    s = stats() if stats is not None else None
    if not isinstance(s, dict):
        return None
    prefix = s.get("prefix_cache") or (s.get("backend_stats") or {}).get("prefix_cache")
    if not isinstance(prefix, dict) or "queried_tokens" not in prefix or "hit_tokens" not in prefix:
        return None
    return prefix
