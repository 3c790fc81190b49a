"""Prompt assembly with a token budget.

Layout (the chat template of the generation model wraps it):

- system: fixed instructions, first, so that every prompt shares one prefix that vLLM's
  prefix cache reuses across questions;
- user: the retrieved chunks, each between clear ``[source N]`` / ``[end of source N]``
  markers with its document id, then the question last.

The budget is ``prompt tokens + max_tokens <= max_model_len``. When the chunks do not fit,
the lowest-ranked are dropped (and counted in the result) instead of the answer coming
back truncated or empty. If even the best chunk alone is too long, its text is cut to fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ragserve.config import PROMPT_TEMPLATE_VERSION
from ragserve.errors import QuestionTooLongError
from ragserve.types import Source

SYSTEM = (
    "You answer questions using only the numbered sources given by the user. "
    "Answer in one or two short sentences. If the sources do not contain the answer, "
    "say that you do not know."
)


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int
    used: list[Source]
    dropped: int
    template_version: str = PROMPT_TEMPLATE_VERSION
    token_ids: list[int] = field(default_factory=list, repr=False)
    """The prompt as the model's tokenizer encodes it: handed to vLLM as is, so the
    prompt is not tokenized a second time."""


def render_user(question: str, sources: Sequence[Source]) -> str:
    parts = []
    for n, s in enumerate(sources, 1):
        parts.append(f"[source {n}: {s.doc_id}]\n{s.text.strip()}\n[end of source {n}]")
    context = "\n\n".join(parts) if parts else "(no sources)"
    return f"Sources:\n\n{context}\n\nQuestion: {question}"


class PromptBuilder:
    """**Usage:** ``PromptBuilder(tokenizer, 2048, 64).build(question, sources)``"""

    def __init__(self, tokenizer: Any, max_model_len: int, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.budget = max_model_len - max_tokens

    def _render(self, question: str, sources: Sequence[Source]) -> tuple[str, list[int]]:
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": render_user(question, sources)},
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The chat template already holds the special tokens: count without adding more.
        return text, list(self.tokenizer.encode(text, add_special_tokens=False))

    def build(self, question: str, sources: Sequence[Source]) -> Prompt:
        text, ids = self._render(question, sources)
        if len(ids) <= self.budget:
            return Prompt(text, len(ids), list(sources), 0, token_ids=ids)
        bare_tokens = len(self._render(question, [])[1])
        if bare_tokens > self.budget:
            raise QuestionTooLongError(bare_tokens, self.budget, "prompt tokens")
        # Binary search for the most sources that fit (token count grows with n).
        lo, hi = 0, len(sources) - 1  # n=lo fits; n=len(sources) does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self._render(question, sources[:mid])[1]) <= self.budget:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0 and sources:
            return self._truncated_first(question, sources[0], len(sources) - 1, bare_tokens)
        text, ids = self._render(question, sources[:lo])
        return Prompt(text, len(ids), list(sources[:lo]), len(sources) - lo, token_ids=ids)

    def _truncated_first(self, question: str, first: Source, dropped: int, bare_tokens: int) -> Prompt:
        ids = self.tokenizer.encode(first.text, add_special_tokens=False)
        keep = max(self.budget - bare_tokens - 32, 0)  # room for the source markers
        while True:
            cut = Source(first.doc_id, first.chunk_id, first.score,
                         self.tokenizer.decode(ids[:keep]), {**first.metadata, "truncated": True})
            text, ids = self._render(question, [cut])
            if len(ids) <= self.budget or keep == 0:
                return Prompt(text, len(ids), [cut], dropped, token_ids=ids)
            keep = max(keep - (len(ids) - self.budget) - 8, 0)
