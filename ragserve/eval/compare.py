"""Two (or more) configurations of a running engine, compared on the caller's questions.

``POST /v1/eval`` runs this: each question is answered once per variant, with the answer
cache bypassed (read and write), and scored as ``ragserve eval --answers`` scores it
(``answers.score``: contains-gold, EM, F1, the extractive baseline, groundedness). Each
run reports the same ``answers`` object and ``per_question`` rows as the CLI's report,
and beside them every stage's p50/p95 from the answers' own ``Timings``
(``StageStats.summary``, as ``stats()`` reports them).

A variant changes what one request may change on a running engine: ``top_k`` today. (The
model, the prompt or the index need another engine: compare two servers, or run
``ragserve eval --answers`` once per configuration.)

**Usage:** ``report = await acompare(rag, questions, [Variant("k4", top_k=4), Variant("k8", top_k=8)])``
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragserve.eval.answers import ANSWER_ROW_KEYS, answer_all, score, summarize
from ragserve.eval.datasets import EvalQuestion
from ragserve.observe.timing import StageStats
from ragserve.types import Timings

SCHEMA = "ragserve.eval-runs/1"
"""Keys are added under a schema, never renamed or removed."""


@dataclass(frozen=True)
class Variant:
    name: str
    top_k: int | None = None
    """Chunks retrieved (None: the engine's ``query.top_k``)."""


async def acompare(rag: Any, questions: Sequence[EvalQuestion], variants: Sequence[Variant], *,
                   concurrency: int = 8) -> dict[str, Any]:
    """Answer ``questions`` under each variant in turn (``concurrency`` in flight) and score
    them; one failed question is an error in its run's rows, never the whole report's."""
    runs = []
    for v in variants:
        top_k = v.top_k or rag.config.query.top_k
        t = time.perf_counter()
        results = await answer_all(rag, questions, concurrency, cache_read=False, cache_write=False, top_k=top_k)
        rows = [score(q, r) for q, r in zip(questions, results)]
        metrics = summarize(rows, time.perf_counter() - t)
        timings = [r.timings for r in results if not isinstance(r, Exception)]
        runs.append({"name": v.name, "config": {"top_k": top_k}, "answers": dataclasses.asdict(metrics),
                     "stages": stage_summary(timings),
                     "per_question": [{"qid": q.qid, **{k: row[k] for k in ANSWER_ROW_KEYS}}
                                      for q, row in zip(questions, rows)]})
    return {"schema": SCHEMA, "index": {"fingerprint": rag.fingerprint}, "questions": len(questions),
            "concurrency": concurrency, "runs": runs}


def stage_summary(timings: Sequence[Timings]) -> dict[str, dict[str, float]]:
    """Each stage's count, mean and p50/p95/p99 (ms) over the answers that ran it: the
    engine's own ``StageStats.summary``, over this run's answers only."""
    stats = StageStats(window=max(1, len(timings)))
    for t in timings:
        stats.record({stage: ms for stage, ms in t.as_dict().items() if ms})
    return stats.summary()
