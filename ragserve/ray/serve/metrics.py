"""The ingress replicas' metrics in Ray's own metrics pipeline: one scrape, every replica.

Behind Serve's proxy, ``GET /metrics`` reaches whichever replica the proxy picks, so a
Prometheus scraping it sees one replica's counters one time and another's the next. Ray
already solves this for Serve's own metrics: every node's metrics agent exports what the
processes on that node record (``ray.serve.metrics``, tagged with ``deployment``,
``replica`` and ``application``) on the node's metrics export port, which Prometheus
scrapes per node (Ray's service-discovery file lists them). ``RayMetrics`` is a request
observer (``observe/observers.py``), like the Prometheus exporter of ``ragserve serve``, that
records the same series there. Ray prefixes them with ``ray_``:

| metric (as exported) | type | tags (plus deployment, replica, application) |
|---|---|---|
| ``ray_ragserve_stage_duration_seconds`` | histogram | ``stage`` |
| ``ray_ragserve_requests_total`` | counter | ``outcome`` |
| ``ray_ragserve_answers_total`` | counter | ``cache_tier`` |
| ``ray_ragserve_partial_answers_total`` | counter | (answers without some shards: ``ray.allow_partial``) |
| ``ray_ragserve_errors_total`` | counter | ``type`` |
| ``ray_ragserve_admission_rejections_total`` | counter | |
| ``ray_ragserve_generated_tokens_total``, ``ray_ragserve_prompt_tokens_total`` | counter | |

The names and meanings are ``server/telemetry.py``'s; the outcome of an error is its
``error_series``. Ray's agent exports what a process recorded every few seconds, so a
scrape lags the requests by that much.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ragserve.server.prometheus import BUCKETS, error_series


class RayMetrics:
    """**Usage:** ``rag.observers.add(RayMetrics())`` in a Serve replica."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.stages = metrics.Histogram("ragserve_stage_duration_seconds", "Time spent in each stage of a request",
                                        boundaries=list(BUCKETS), tag_keys=("stage",))
        self.requests = metrics.Counter("ragserve_requests", "Requests by outcome", tag_keys=("outcome",))
        self.answers = metrics.Counter("ragserve_answers", "Answered requests by the cache tier that answered",
                                       tag_keys=("cache_tier",))
        self.partial = metrics.Counter("ragserve_partial_answers",
                                       "Answers without some shards of a sharded index (ray.allow_partial)")
        self.errors = metrics.Counter("ragserve_errors", "Failed requests by error type", tag_keys=("type",))
        self.rejections = metrics.Counter("ragserve_admission_rejections", "Requests refused at admission (429)")
        self.completion_tokens = metrics.Counter("ragserve_generated_tokens", "Tokens generated (each run once)")
        self.prompt_tokens = metrics.Counter("ragserve_prompt_tokens",
                                             "Prompt tokens sent to the engine (each run once)")

    def on_result(self, result: Any, stages: Mapping[str, float]) -> None:
        for stage, ms in stages.items():
            self.stages.observe(ms / 1e3, tags={"stage": stage})
        self.requests.inc(tags={"outcome": "ok"})
        self.answers.inc(tags={"cache_tier": result.cache_tier})
        if result.missing_shards:
            self.partial.inc()

    def on_generation(self, result: Any) -> None:
        usage = result.usage
        if usage.completion_tokens:
            self.completion_tokens.inc(usage.completion_tokens)
        if usage.prompt_tokens:
            self.prompt_tokens.inc(usage.prompt_tokens)

    def on_error(self, error: BaseException) -> None:
        outcome, rejected, error_type = error_series(error)
        self.requests.inc(tags={"outcome": outcome})
        if rejected:
            self.rejections.inc()
        if error_type is not None:
            self.errors.inc(tags={"type": error_type})
