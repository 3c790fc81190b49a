"""One streamed ``POST /v1/completions`` as the openai backend sends and reads it: the
request body, and what an attempt has received (pieces, usage, times) until it becomes a
``Generation``.

The SSE chunks are vLLM's ``text_completion`` objects: one per engine step with the text
delta and, on the last, its ``finish_reason``; then, asked for with
``stream_options.include_usage``, one with no choices and the ``usage`` (and, from a vLLM
server started with ``--enable-per-request-metrics``, ``metrics``: its own timings); then
``data: [DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ragserve.config import GenerateConfig
from ragserve.errors import GenerationError
from ragserve.types import Generation, TokenUsage


def request_body(config: GenerateConfig, model: str, prompt: str, token_ids: Sequence[Any] | None,
                 priority: int = 0) -> dict[str, Any]:
    """The rendered prompt as token ids when the tokenizer gave integers (vLLM tokenizes
    nothing again), else as text; the shared sampling of ``[generate]``; with
    ``generate.scheduling = "priority"``, vLLM's ``priority`` field."""
    ids = list(token_ids) if token_ids and all(type(t) is int for t in token_ids) else None
    body: dict[str, Any] = {
        "model": model, "prompt": ids if ids is not None else prompt, "max_tokens": config.max_tokens,
        "temperature": config.temperature, "top_p": config.top_p,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if config.temperature > 0:  # as the vllm backend: a seed means nothing to greedy decoding
        body["seed"] = config.seed
    if config.scheduling == "priority":
        body["priority"] = priority
    return body


def parse_chunk(data: str, where: str) -> dict[str, Any]:
    """One ``data:`` payload as a JSON object (``where`` names the server in the error)."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise GenerationError(f"{where} sent a chunk that is not JSON: {data[:120]!r}") from e
    if not isinstance(chunk, dict):
        raise GenerationError(f"{where} sent a chunk that is not a JSON object: {data[:120]!r}")
    return chunk


@dataclass
class Attempt:
    """What one attempt on one endpoint has received so far."""

    sent: float
    """``perf_counter()`` when the request was sent."""
    pieces: list[str] = field(default_factory=list)
    first: float = 0.0
    """``perf_counter()`` of the first chunk with a choice (0: none yet)."""
    last: float = 0.0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    done: bool = False
    """``data: [DONE]`` came: the stream is whole."""

    @property
    def started(self) -> bool:
        """Something was generated: from here on a failure must not be retried."""
        return self.first > 0

    def add(self, chunk: dict[str, Any]) -> str:
        """Take one ``text_completion`` chunk; returns its text delta ("" for none)."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if chunk.get("metrics"):
            self.metrics = chunk["metrics"]
        choices = chunk.get("choices") or []
        if not choices:
            return ""
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        choice = choices[0]
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        text = choice.get("text") or ""
        if text:
            self.pieces.append(text)
        return text

    def generation(self, token_ids: Sequence[Any] | None) -> Generation:
        """The result: the server's usage (else counted here) and the stage split (the
        server's own timings if it sent them, else measured here; see ``openai.py``)."""
        usage = self.usage or {}
        prompt_tokens = int(usage.get("prompt_tokens") or len(token_ids or ()))
        completion = int(usage.get("completion_tokens") or len(self.pieces))
        m = self.metrics or {}
        if m.get("time_to_first_token_ms") is not None:
            queue = float(m.get("queue_time_ms") or 0.0)
            first = float(m["time_to_first_token_ms"])
            decode = float(m.get("generation_time_ms") or 0.0)
        else:
            first_at = self.first or self.last or time.perf_counter()
            queue, first = 0.0, (first_at - self.sent) * 1e3
            decode = (max(self.last, first_at) - first_at) * 1e3
        return Generation(text="".join(self.pieces).strip(),
                          usage=TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=completion),
                          finish_reason=self.finish_reason, queue_ms=queue, first_token_ms=first,
                          decode_ms=decode)
