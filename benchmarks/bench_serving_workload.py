"""The serving benchmark's workload: XQuAD questions with gold answers, the corpus and
index they are asked against, and the answer check (see ``bench_serving.py``)."""

from __future__ import annotations

import json
import random
import re
import string
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
XQUAD = REPO.parent / "shared" / "data" / "xquad-en" / "xquad.en.json"


@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[str, ...]
    doc_id: str


@dataclass
class Workload:
    warmup: list[Question]
    levels: dict[int, list[Question]]
    spare: list[Question] = field(default_factory=list)
    """Questions used by no serving run (the embedding benchmark takes its questions here)."""


def normalize_like_ragserve(question: str) -> str:
    # ragserve answers the NFKC, whitespace-collapsed question. Asking that form everywhere
    # makes the raw-vLLM prompts (built here) byte-identical to the ones ragserve builds.
    return " ".join(unicodedata.normalize("NFKC", question).split())


def load_questions(path: Path = XQUAD) -> list[Question]:
    """Every distinct XQuAD question (first occurrence kept), in file order."""
    if not path.is_file():
        raise SystemExit(f"XQuAD data not found at {path} (pass --xquad)")
    seen: set[str] = set()
    out = []
    for article in json.loads(path.read_text("utf-8"))["data"]:
        for i, para in enumerate(article["paragraphs"]):
            for qa in para["qas"]:
                text = normalize_like_ragserve(qa["question"])
                if text and text.lower() not in seen:
                    seen.add(text.lower())
                    out.append(Question(text, tuple(a["text"] for a in qa["answers"]),
                                        f"{article['title']}_{i}.txt"))
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
    n = 0
    for article in json.loads(path.read_text("utf-8"))["data"]:
        for i, para in enumerate(article["paragraphs"]):
            (folder / f"{article['title']}_{i}.txt").write_text(para["context"], encoding="utf-8")
            n += 1
    return n


def ensure_index(index: Path, xquad: Path, config) -> str:
    """Build the XQuAD index at ``index`` if it is not there; says what it did."""
    if (index / "manifest.json").is_file():
        return f"{index} (existing)"
    from ragserve import build_index

    corpus = REPO / "build" / "xquad-corpus"
    n = write_corpus(corpus, xquad)
    report = build_index(corpus, index, config)
    return f"{index} (built now: {n} paragraphs, {report.chunks} chunks, {report.seconds['total']:.0f} s)"


# -- answer check (SQuAD's normalisation) --------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD v1.1 eval)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def gold_hit(answer: str, golds: tuple[str, ...]) -> bool:
    """The normalised answer contains a normalised gold answer as whole words (so that a
    gold "1" does not match "1990")."""
    a = f" {squad_normalize(answer)} "
    return any(g and f" {g} " in a for g in map(squad_normalize, golds))


EMPTY_ANSWERS = {"", "empty response"}
"""LlamaIndex returns "Empty Response" when synthesis got nothing back: not an answer."""


def is_answer(text: str | None) -> bool:
    return bool(text) and text.strip().lower() not in EMPTY_ANSWERS
