"""``[query]``: one request's bounds: top_k, question length, deadline, admission."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueryConfig:
    top_k: int = 3
    """Chunks retrieved per question."""
    max_question_chars: int = 2000
    """Longer questions are refused with QuestionTooLongError."""
    timeout_s: float = 0.0
    """Default deadline of a request that runs the pipeline, in seconds (0: none). Past
    it the request fails with DeadlineExceededError and its vLLM request is aborted."""
    max_in_flight: int = 64
    """Pipeline runs (retrieval + generation) admitted at once; all of them reach vLLM
    together, so this bounds its batch from above."""
    max_queued: int = 256
    """Runs waiting for a slot. Past it a request fails at once with OverloadedError:
    no unbounded queue, no memory growth."""
    reserved_in_flight: int = 0
    """Slots of max_in_flight kept for urgent requests (priority <= urgent_priority): the
    others start only while more slots than this are free, so a flood of batch requests
    (priority 10, say) never holds the slot an interactive one needs."""
    urgent_priority: int = 0
    """The highest priority number that may take a reserved slot (lower runs sooner)."""
