"""``[prompt]``: which retrieved sources reach the prompt, and in what order.

Both change answers, so both are part of the answer fingerprint (``RAGConfig.fingerprint``)
together with ``PROMPT_TEMPLATE_VERSION``, which names the wording of the instructions.
The defaults come from measurements on XQuAD-en (the tables in ``docs/prompting.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ragserve.errors import ConfigError

PROMPT_TEMPLATE_VERSION = "v2"
"""v1: numbered sources with markers, "one or two short sentences".
v2: a short-answer instruction, plain context, sources far below the best one left out,
duplicate texts once."""

SourceOrder = Literal["score", "chunk_id"]


@dataclass(frozen=True)
class PromptConfig:
    max_score_gap: float = 0.05
    """A retrieved source whose score is more than this below the best source's is left
    out of the prompt (and out of the result's sources). Scores are the embedding model's
    cosine similarities; 0 keeps every source. With a small generation model a weak
    source mostly distracts it: on XQuAD-en this took contains-gold from 0.27 to 0.43."""
    order: SourceOrder = "score"
    """How the chosen sources are laid out before the question. "score": best first.
    "chunk_id": index order, so that two questions reading the same chunks send the same
    prefix and vLLM's prefix cache serves it again. Measured on the CPU backend (128-token
    KV blocks) with the default selection, both orders reused the same share of prompt
    tokens and "score" answered better; see ``benchmarks/bench_prefix_layout.py``."""


def validate_prompt(p: PromptConfig) -> None:
    if not 0 <= p.max_score_gap <= 2:
        raise ConfigError("prompt.max_score_gap", f"must be in [0, 2] (0 keeps every source), got {p.max_score_gap}")
    if p.order not in ("score", "chunk_id"):
        raise ConfigError("prompt.order", f"must be one of 'score', 'chunk_id', got {p.order!r}")
