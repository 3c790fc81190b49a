"""The serving benchmark's workload: XQuAD questions with gold answers, the corpus and
index they are asked against (see ``bench_serving.py``). The answer check is
``ragserve.eval.scoring.contains_answer`` (SQuAD normalisation, whole words)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

import harness

from ragserve.cache.keys import normalize_question
from ragserve.eval.datasets import EvalQuestion, load_squad, squad_paragraphs

XQUAD = harness.XQUAD
Question = EvalQuestion
"""A question as the serving benchmarks ask it: ``text`` (normalised as ragserve normalises
it), gold ``answers``."""


@dataclass
class Workload:
    warmup: list[Question]
    levels: dict[int, list[Question]]
    spare: list[Question] = field(default_factory=list)
    """Questions used by no serving run (the embedding benchmark takes its questions here)."""


def load_questions(path: Path = XQUAD) -> list[Question]:
    """Every distinct XQuAD question (first occurrence kept, case aside), in file order.

    The text is ragserve's normalised question (NFKC, whitespace collapsed): asking that form
    everywhere makes the raw-vLLM prompts (built from it) byte-identical to ragserve's."""
    if not path.is_file():
        raise SystemExit(f"XQuAD data not found at {path} (pass --xquad)")
    seen: set[str] = set()
    out = []
    for q in load_squad(path).questions:
        text = normalize_question(q.text)
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(dataclasses.replace(q, text=text))
    return out


def split(questions: list[Question], per_level: dict[int, int], warmup: int, seed: int) -> Workload:
    """A seeded shuffle cut into a warm-up pool and one disjoint slice per concurrency.

    Every system gets the same slice at a given concurrency; slices of different levels do
    not overlap, and no measured question is ever a warm-up question.
    """
    pool = list(questions)
    random.Random(seed).shuffle(pool)
    need = warmup + sum(per_level.values())
    if need > len(pool):
        raise SystemExit(f"{need} questions asked for, XQuAD has {len(pool)} distinct ones")
    levels, start = {}, warmup
    for c, n in per_level.items():
        levels[c] = pool[start:start + n]
        start += n
    return Workload(pool[:warmup], levels, pool[start:])


def write_corpus(folder: Path, path: Path = XQUAD) -> int:
    """One .txt per XQuAD paragraph (``Title_N.txt``), as the test suite's corpus does."""
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = squad_paragraphs(path)
    for p in paragraphs:
        (folder / f"{p.title}_{p.position}.txt").write_text(p.context, encoding="utf-8")
    return len(paragraphs)


def ensure_index(index: Path, xquad: Path, config) -> str:
    """Build the XQuAD index at ``index`` if it is not there; says what it did."""
    if (index / "manifest.json").is_file():
        return f"{index} (existing)"
    from ragserve import build_index

    corpus = harness.REPO / "build" / "xquad-corpus"
    n = write_corpus(corpus, xquad)
    report = build_index(corpus, index, config)
    return f"{index} (built now: {n} paragraphs, {report.chunks} chunks, {report.seconds['total']:.0f} s)"


EMPTY_ANSWERS = {"", "empty response"}
"""LlamaIndex returns "Empty Response" when synthesis got nothing back: not an answer."""


def is_answer(text: str | None) -> bool:
    return bool(text) and text.strip().lower() not in EMPTY_ANSWERS
