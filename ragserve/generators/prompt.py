"""Prompt assembly: which sources, in what order, within a token budget.

Layout (the chat template of the generation model wraps it):

- system: fixed instructions, first, so that every prompt shares one prefix that vLLM's
  prefix cache reuses across questions;
- user: the chosen chunks (``[prompt] order``: best first, or in index order so that
  questions reading the same chunks share a longer prefix), then the question last.

Which sources (``select_sources``): a text retrieved twice (two files holding the same
paragraph) appears once, and a source far below the best one (``[prompt]
max_score_gap``) is left out: a small model is distracted by it more than it is helped.
The sources a result reports are the ones its prompt used.

The budget is ``prompt tokens + max_tokens <= max_model_len``. When the chunks do not fit,
the lowest-ranked are dropped (and counted in the result) instead of the answer coming
back truncated or empty. If even the best chunk alone is too long, its text is cut to fit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ragserve.config.prompt import PROMPT_TEMPLATE_VERSION, PromptConfig
from ragserve.errors import QuestionTooLongError
from ragserve.types import Source

_WORDS = re.compile(r"\w+")

SYSTEM = "Answer with a short phrase copied from the context. Give only the answer."


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
    context = "\n\n".join(s.text.strip() for s in sources) if sources else "(no context)"
    return f"Context:\n{context}\n\nQuestion: {question}"


def select_sources(sources: Sequence[Source], max_score_gap: float) -> list[Source]:
    """The sources worth showing, best first: each text once (its best-scored copy), and
    none scoring more than ``max_score_gap`` below the best (0: no such cut).

    Two texts are the same when their words are: the same paragraph in two files may
    differ only in markup, such as a heading underlined with "----" in one and "====" in
    the other (CPython's help topics ``try`` and ``compound`` do)."""
    ranked = sorted(sources, key=lambda s: -s.score)
    seen: set[str] = set()
    out = []
    for s in ranked:
        text = " ".join(_WORDS.findall(s.text.casefold()))
        if text in seen:
            continue
        if max_score_gap > 0 and out and s.score < out[0].score - max_score_gap:
            break
        seen.add(text)
        out.append(s)
    return out


def lay_out(sources: Sequence[Source], order: str) -> list[Source]:
    """The chosen sources in prompt order ("chunk_id": the index's order, whatever the
    scores, so that questions reading the same chunks send the same prompt prefix)."""
    return sorted(sources, key=lambda s: s.chunk_id) if order == "chunk_id" else list(sources)


class PromptBuilder:
    """**Usage:** ``PromptBuilder(tokenizer, 2048, 64).build(question, sources)``"""

    def __init__(self, tokenizer: Any, max_model_len: int, max_tokens: int,
                 config: PromptConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.budget = max_model_len - max_tokens
        self.config = config or PromptConfig()

    def _render(self, question: str, sources: Sequence[Source]) -> tuple[str, list[int]]:
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": render_user(question, sources)},
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The chat template already holds the special tokens: count without adding more.
        return text, list(self.tokenizer.encode(text, add_special_tokens=False))

    def build(self, question: str, sources: Sequence[Source]) -> Prompt:
        """The prompt for ``question`` over the chosen ``sources`` (any order: they are
        ranked by score here). When they do not fit the budget, the lowest-scored go first,
        whatever the layout order."""
        ranked = select_sources(sources, self.config.max_score_gap)
        used = lay_out(ranked, self.config.order)
        text, ids = self._render(question, used)
        if len(ids) <= self.budget:
            return Prompt(text, len(ids), used, 0, token_ids=ids)
        return self._fit(question, ranked)

    def _fit(self, question: str, sources: list[Source]) -> Prompt:
        bare_tokens = len(self._render(question, [])[1])
        if bare_tokens > self.budget:
            raise QuestionTooLongError(bare_tokens, self.budget, "prompt tokens")
        # Binary search for the most sources that fit (token count grows with n).
        lo, hi = 0, len(sources) - 1  # n=lo fits; n=len(sources) does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self._render(question, lay_out(sources[:mid], self.config.order))[1]) <= self.budget:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0 and sources:
            return self._truncated_first(question, sources[0], len(sources) - 1, bare_tokens)
        used = lay_out(sources[:lo], self.config.order)
        text, ids = self._render(question, used)
        return Prompt(text, len(ids), used, len(sources) - lo, token_ids=ids)

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
