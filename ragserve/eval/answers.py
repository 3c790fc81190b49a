"""Answer quality: generate an answer per question and score it against the gold answers.

The protocol ``ragserve eval --answers --sample 200 --seed 1`` runs is fixed so that two
runs (or two prompts) are compared on the same questions: ``sample_questions`` draws
``random.Random(seed).sample(questions in file order, n)``. Scores use SQuAD's answer
normalisation (``eval/scoring.py``):

- ``contains``: the answer contains a gold answer as whole words (the main figure: a
  generative model answers in its own words around the span);
- ``exact_match`` and ``f1``: SQuAD's EM and token F1;
- ``mean_words``, ``cut_share`` (stopped at ``max_tokens``: finish reason "length") and
  ``empty_share``: how the answers are shaped;
- ``baseline_*``: the same three scores for the no-model baseline, the window of the top
  source of the answer's own length with the most question words (``eval/grounding.py``):
  what the generator adds is the difference;
- ``grounded``: the mean share of an answer's content words found in its sources, and
  ``ungrounded_share``: the share of answers with a number or name no source has;
- ``models``: how many answers each model gave (the result's ``model``: the one asked for,
  the default, or with ``route = "auto"`` the router's pick).

**Usage:** ``metrics, rows = answer_metrics(rag, sample_questions(ds.questions, 200, 1))``
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ragserve.engine.runtime import map_bounded
from ragserve.eval.datasets import EvalQuestion
from ragserve.eval.grounding import extractive_window, groundedness
from ragserve.eval.scoring import contains_answer, exact_match, token_f1

ProgressFn = Callable[[str, int, int], None]

ANSWER_ROW_KEYS = ("answer", "model", "contains", "em", "f1", "cut", "error", "baseline", "baseline_contains",
                   "baseline_em", "baseline_f1", "grounded", "ungrounded")
"""The per-question answer fields of a report (``score``'s row, in this order)."""


@dataclass
class AnswerMetrics:
    questions: int
    contains: float
    exact_match: float
    f1: float
    errors: int
    seconds: float
    mean_words: float = 0.0
    cut_share: float = 0.0
    """Share of answers stopped by ``generate.max_tokens`` rather than ended by the model."""
    empty_share: float = 0.0
    """Share of answers that are empty (a failed question counts as empty)."""
    baseline_contains: float = 0.0
    """``contains`` of the extractive baseline: the top source's window of the answer's length."""
    baseline_exact_match: float = 0.0
    baseline_f1: float = 0.0
    grounded: float = 0.0
    """Mean share of an answer's content words (numbers, names, nouns...) found in its sources."""
    ungrounded_share: float = 0.0
    """Share of answers with a number or a name that none of their sources has."""
    models: dict[str, int] = field(default_factory=dict)
    """Answers per model that gave them (a failed question is in none)."""


def sample_questions(questions: Sequence[EvalQuestion], n: int | None, seed: int = 1) -> list[EvalQuestion]:
    """``n`` questions drawn with ``random.Random(seed).sample`` from the file's order (all
    of them, in file order, when ``n`` is None or covers the set)."""
    if n is None or n >= len(questions):
        return list(questions)
    return random.Random(seed).sample(list(questions), n)


def answer_metrics(rag: Any, questions: Sequence[EvalQuestion], *, concurrency: int = 16,
                   progress: ProgressFn | None = None, model: str | None = None
                   ) -> tuple[AnswerMetrics, list[dict[str, Any]]]:
    """Generate an answer per question and score it against the gold answers. A failed
    question counts as an error and scores 0. ``model``: which of ``[models]`` answers
    (None: what a request naming none gets), as ``rag.aquery(model=...)`` takes it.

    ``concurrency`` requests stay in flight the whole time (a new one starts as soon as one
    finishes, rather than batch after batch) so that vLLM's continuous batching stays full.
    """
    t = time.perf_counter()
    options = {"model": model} if model is not None else {}
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        results = asyncio.run(answer_all(rag, questions, concurrency, progress, **options))
    else:  # called from inside an event loop (a notebook): run ours on a helper thread
        with ThreadPoolExecutor(max_workers=1) as pool:
            results = pool.submit(asyncio.run, answer_all(rag, questions, concurrency, progress,
                                                          **options)).result()
    rows = [score(q, r) for q, r in zip(questions, results)]
    return summarize(rows, time.perf_counter() - t), rows


def summarize(rows: Sequence[dict[str, Any]], seconds: float) -> AnswerMetrics:
    """The means of ``score``'s rows (a failed question is in them, scoring 0)."""
    n = max(1, len(rows))

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in rows) / n

    return AnswerMetrics(
        questions=len(rows), contains=mean("contains"), exact_match=mean("em"), f1=mean("f1"),
        errors=sum(r["error"] is not None for r in rows), seconds=round(seconds, 3),
        mean_words=sum(len(r["answer"].split()) for r in rows) / n, cut_share=mean("cut"),
        empty_share=sum(not r["answer"].strip() for r in rows) / n,
        baseline_contains=mean("baseline_contains"), baseline_exact_match=mean("baseline_em"),
        baseline_f1=mean("baseline_f1"), grounded=mean("grounded"),
        ungrounded_share=sum(bool(r["ungrounded"]) for r in rows) / n,
        models=dict(Counter(r["model"] for r in rows if r["model"])),
    )


def score(question: EvalQuestion, result: Any) -> dict[str, Any]:
    """One question's row: its answer (or error), its scores, the extractive baseline of the
    same length and its scores, and how grounded the answer is in its sources."""
    failed = isinstance(result, Exception)
    answer = "" if failed else result.answer
    sources = [] if failed else [s.text for s in result.sources]
    baseline = extractive_window(question.text, sources[0], len(answer.split())) if sources else ""
    grounding = groundedness(answer, sources)
    golds = question.answers
    return {"answer": answer, "model": None if failed else getattr(result, "model", None),
            "error": repr(result) if failed else None,
            "cut": (not failed) and getattr(result, "finish_reason", None) == "length",
            "contains": contains_answer(answer, golds), "em": exact_match(answer, golds),
            "f1": token_f1(answer, golds),
            "baseline": baseline, "baseline_contains": contains_answer(baseline, golds),
            "baseline_em": exact_match(baseline, golds), "baseline_f1": token_f1(baseline, golds),
            "grounded": 0.0 if failed else grounding.grounded_share, "ungrounded": list(grounding.ungrounded)}


async def answer_all(rag: Any, questions: Sequence[EvalQuestion], concurrency: int,
                     progress: ProgressFn | None = None, **options: Any) -> list[Any]:
    """``rag.aquery(question, **options)`` for each question, ``concurrency`` at once; a
    failed question's exception stays in its slot."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress("answers", done, len(questions))

    # One failed question is scored, not fatal: it stays in its slot.
    return await map_bounded(lambda q: rag.aquery(q.text, **options), questions, concurrency, on_done=tick)
