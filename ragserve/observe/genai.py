"""What the spans of a request are called and what they say: the OpenTelemetry GenAI
semantic conventions **v0.1.0** (``open-telemetry/semantic-conventions-genai``, on semantic
conventions 1.45.0; Development status) where they have a name, vLLM's ``gen_ai.latency.*``
as vLLM emits them, ragserve's own under ``ragserve.*``. Content (question, answer, the
sources' text) only with ``capture_content``.

Plain functions of a result and its stage times: no OpenTelemetry here (``traces.py``
builds the spans).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GENAI_SEMCONV = "0.1.0"
"""The version of the OpenTelemetry GenAI semantic conventions these spans follow."""


def query_attributes(result: Any, leader: str | None, capture_content: bool) -> dict[str, Any]:
    """``ragserve.query``: the request as a whole."""
    a: dict[str, Any] = {"ragserve.request_id": result.request_id, "ragserve.cache.tier": result.cache_tier,
                         "ragserve.index.fingerprint": result.index_fingerprint,
                         "ragserve.single_flight.shared": bool(result.shared)}
    if leader is not None:
        a["ragserve.single_flight.leader"] = leader
    if capture_content:
        a["ragserve.question"] = result.question
        a["ragserve.answer"] = result.answer
    return a


@dataclass(frozen=True)
class Naming:
    """The names of a server's stage spans: ``embed_model`` (the embeddings' model),
    ``backend`` (the chat's ``gen_ai.provider.name``), ``top_k`` (the configured one)."""

    capture_content: bool = False
    embed_model: str = ""
    backend: str = ""
    top_k: int = 0

    def stage(self, stage: str, result: Any, stages: Mapping[str, float]) -> tuple[str, bool, dict[str, Any]]:
        """A stage's span name, whether it is a client span (a call out), its attributes."""
        if stage == "embed":
            return (f"embeddings {self.embed_model}".strip(), False,
                    {"gen_ai.operation.name": "embeddings", "gen_ai.request.model": self.embed_model})
        if stage == "search":
            return "retrieval", False, self.retrieval(result)
        if stage == "generate":
            return f"chat {result.model}".strip(), True, self.chat(result, stages)
        return f"ragserve.{stage}", False, {}

    def constant(self, stage: str) -> tuple[str, bool, dict[str, Any]] | None:
        """``stage``'s span name, client flag and attributes when they are the same for every
        request (made once by the tracing thread), else None (the retrieval's and the chat's,
        which ``stage`` makes from each result)."""
        if stage in ("search", "generate"):
            return None
        return self.stage(stage, None, {})

    def retrieval(self, result: Any) -> dict[str, Any]:
        sources = result.sources
        a: dict[str, Any] = {
            "gen_ai.operation.name": "retrieval", "gen_ai.data_source.id": result.index_fingerprint,
            # NOTE: the configured top_k: a request's own top_k is not in its result.
            "gen_ai.retrieval.top_k": self.top_k, "ragserve.retrieval.used": len(sources),
            "ragserve.retrieval.scores": tuple(float(s.score) for s in sources),
            "ragserve.retrieval.chunk_ids": tuple(int(s.chunk_id) for s in sources),
            "ragserve.retrieval.dropped": result.dropped_sources}
        if self.capture_content:
            a["gen_ai.retrieval.query.text"] = result.question
            a["gen_ai.retrieval.documents"] = json.dumps(
                [{"id": f"{s.doc_id}#{s.chunk_id}", "score": float(s.score), "content": s.text}
                 for s in sources])
        return a

    def chat(self, result: Any, stages: Mapping[str, float]) -> dict[str, Any]:
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
            a["gen_ai.response.finish_reasons"] = (result.finish_reason,)
        if self.capture_content:
            a["gen_ai.output.messages"] = json.dumps(
                [{"role": "assistant", "parts": [{"type": "text", "content": result.answer}],
                  "finish_reason": result.finish_reason or "stop"}])
        return a
