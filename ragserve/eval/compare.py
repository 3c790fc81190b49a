"""Two (or more) configurations of a running engine, compared on the caller's questions.

``POST /admin/eval`` runs this: per configuration, ``report.build_report`` over the served
engine with answers, the one report builder ``ragserve eval`` uses, so each configuration's
report is exactly what ``ragserve eval QUESTIONS.json --index INDEX --answers --top-k K
--concurrency C --json`` writes for the same questions and index (timings aside): the
retrieval metrics against exact fp32, the answers' scores (contains-gold, EM, F1, the
extractive baseline, groundedness) and beside them every stage's p50/p95 from the answers'
own ``Timings``. The answer cache is bypassed (read and write).

A configuration changes what one request may change on a running engine: ``top_k`` today.
(The model, the prompt or the index need another engine: compare two servers, or run
``ragserve eval --answers`` once per configuration.)

**Usage:** ``reports = await acompare(rag, questions, [Variant("k4", top_k=4), Variant("k8", top_k=8)])``
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragserve.eval.datasets import EvalQuestion
from ragserve.eval.report import SCHEMA, build_report, dataset_info, stage_summary

__all__ = ["SCHEMA", "Variant", "acompare", "stage_summary"]


@dataclass(frozen=True)
class Variant:
    name: str
    top_k: int | None = None
    """Chunks retrieved (None: the engine's ``query.top_k``)."""


async def acompare(rag: Any, questions: Sequence[EvalQuestion], variants: Sequence[Variant], *,
                   concurrency: int = 8, name: str = "request") -> dict[str, Any]:
    """``{"schema", "reports": [{"name", "report"}]}``: one ``EvalReport.to_dict()`` per
    variant, in turn (``concurrency`` answers in flight); one failed question is an error in
    its report's rows, never the whole comparison's. ``name``: the question set's, as a
    questions file's ``name``."""
    info = dataset_info(name, "questions", len(questions), labelled=sum(
        any(r > 0 for r in q.relevant.values()) for q in questions))
    reports = []
    for v in variants:
        report = await build_report(rag, questions, dataset=info, answers=True, top_k=v.top_k,
                                    concurrency=concurrency)
        reports.append({"name": v.name, "report": report.to_dict()})
    return {"schema": SCHEMA, "reports": reports}
