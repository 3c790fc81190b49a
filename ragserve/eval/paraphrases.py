"""Labelled question pairs for the semantic tier: "is the cached answer right for the new
question?", built from a SQuAD-style file (XQuAD) with no model and no download.

A pair is (cached question, new question, right). ``right`` means the gold answer of the
cached question is a gold answer of the new one — the label the tier needs — not "the
texts look alike". The kinds, and what each label rests on:

- ``rewrite`` (right): the question rewritten by a rule that keeps its meaning — a polite
  frame ("Can you tell me ...", "I'd like to know ..."), a contraction ("What is" →
  "What's"), "Which" ↔ "What", "In what year" → "When", dropped question mark, lower case.
  Synthetic: real users paraphrase more freely (synonyms, reordered clauses), so a
  threshold certified on these is certified for *this* kind of rewording only.
- ``same_answer`` (right): two questions on the same paragraph with the same normalised
  gold answer. Some are real paraphrases; some only share an answer by coincidence ("four"
  points and "four" fumbles) — the cached answer is still right, as the label says.
- ``diff_answer`` (wrong): two questions on the same paragraph whose gold answers share
  nothing (neither normalised answer contains the other): the hard negatives, on the same
  topic with many words in common.
- ``negation`` / ``number`` / ``entity`` (wrong): the question with a negation inserted,
  a number changed or a name swapped for another name of the same paragraph's questions.
  Wrong by construction (a changed condition asks for another answer); a rule can make a
  question that no one would ask, which makes these easier than real ones for a model but
  no easier for the guard.

Every pair carries its paragraph (``group``): splits are by paragraph, so a test split
never shares a paragraph — or a question — with calibration.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from ragserve.cache.keys import normalize_question
from ragserve.eval.datasets import squad_paragraphs
from ragserve.eval.scoring import normalize_answer

POSITIVE_KINDS = ("rewrite", "same_answer")
NEGATIVE_KINDS = ("diff_answer", "negation", "number", "entity")
PERTURBED_KINDS = ("negation", "number", "entity")


@dataclass(frozen=True, slots=True)
class Pair:
    cached: str
    new: str
    right: bool
    kind: str
    group: int
    """The paragraph both questions are about (splits are by it)."""


FRAMES = ("Can you tell me {q}", "Do you know {q}", "I'd like to know {q}", "Please tell me: {Q}",
          "Quick question: {Q}", "I was wondering, {q}", "{Q} Please answer.", "Tell me, {q}")


def _lower_first(q: str) -> str:
    """Lower the first letter unless the first word looks like a name (an inner capital or
    a capitalised second letter is left alone too)."""
    first = q.split(" ", 1)[0]
    if first[:1].isupper() and first[1:].islower() and first.lower() in _QUESTION_STARTS:
        return q[0].lower() + q[1:]
    return q


_QUESTION_STARTS = frozenset("what who whom whose which when where why how in on at from during for to "
                             "by the a an is are was were did does do can could has have had".split())


def rewrites(q: str) -> list[str]:
    """Meaning-keeping rewrites of a question (each rule that applies)."""
    q = " ".join(q.split())
    out = []
    for frame in FRAMES:
        out.append(frame.format(q=_lower_first(q), Q=q))
    for pat, repl in ((r"^What is\b", "What's"), (r"^Who is\b", "Who's"), (r"^Where is\b", "Where's"),
                      (r"^Which\b", "What"), (r"^What (\w+) (did|was|were|is|are|does|do)\b", r"Which \1 \2"),
                      (r"^In what year\b", "When"), (r"^In which year\b", "When"), (r"^How many\b", "What number of")):
        r = re.sub(pat, repl, q)
        if r != q:
            out.append(r)
    if q.endswith("?"):
        out.append(q[:-1].rstrip())
    out.append(q.lower())
    return out


_NEGATABLE = re.compile(r"\b(is|was|are|were|did|does|do|can|could|has|have|had|will|would)\b")
_NUMBER = re.compile(r"\b\d+\b")
_NAME = re.compile(r"(?<!^)(?<![.?!] )\b[A-Z][a-z]+(?: [A-Z][a-z]+)*")


def negated(q: str) -> str | None:
    m = _NEGATABLE.search(q)
    return None if m is None else q[: m.end()] + " not" + q[m.end():]


def renumbered(q: str, rng: random.Random) -> str | None:
    m = _NUMBER.search(q)
    if m is None:
        return None
    n = int(m.group())
    new = n + rng.choice([1, 2, 5, 10]) * rng.choice([-1, 1]) if n > 10 else n + 1
    return q[: m.start()] + str(abs(new)) + q[m.end():]


def renamed(q: str, names: Sequence[str], rng: random.Random) -> str | None:
    found = [m for m in _NAME.finditer(q) if m.start() > 0]
    if not found:
        return None
    m = rng.choice(found)
    old = m.group().lower()
    # Not a form of the same name ("California" → "Californian"): that is no other entity.
    others = [n for n in names if n.lower() not in q.lower() and not n.lower().startswith(old[:5])]
    if not others:
        return None
    return q[: m.start()] + rng.choice(others) + q[m.end():]


def build_pairs(path: Path | str, *, seed: int = 0, rewrites_per_question: int = 1) -> list[Pair]:
    """Every labelled pair of a SQuAD-style file (see the module's docstring)."""
    rng = random.Random(seed)
    pairs: list[Pair] = []
    for group, para in enumerate(squad_paragraphs(path)):
        qas = [(q, {normalize_answer(a) for a in answers}) for _, q, answers in para.qas if answers]
        names = sorted({m.group() for q, _ in qas for m in _NAME.finditer(q) if m.start() > 0})
        for q, _ in qas:
            for new in rng.sample(rewrites(q), min(rewrites_per_question, len(rewrites(q)))):
                pairs.append(Pair(q, new, True, "rewrite", group))
            for kind, new in (("negation", negated(q)), ("number", renumbered(q, rng)),
                              ("entity", renamed(q, names, rng))):
                if new is not None and new != q:
                    pairs.append(Pair(q, new, False, kind, group))
        for (a, ga), (b, gb) in combinations(qas, 2):
            if normalize_question(a) == normalize_question(b):
                continue  # the same text twice (XQuAD has a few): the exact tiers' case
            if ga & gb:
                pairs.append(Pair(a, b, True, "same_answer", group))
            elif not any(x in y or y in x for x in ga for y in gb):
                pairs.append(Pair(a, b, False, "diff_answer", group))
    return pairs


def split_by_group(pairs: Sequence[Pair], fractions: Sequence[float], seed: int = 0) -> list[list[Pair]]:
    """Pairs split by paragraph into ``len(fractions)`` parts of about those shares."""
    groups = sorted({p.group for p in pairs})
    random.Random(seed).shuffle(groups)
    bounds, acc = [], 0.0
    for f in fractions:
        acc += f
        bounds.append(round(acc * len(groups)))
    part_of = {}
    start = 0
    for i, end in enumerate(bounds):
        for g in groups[start:end]:
            part_of[g] = i
        start = end
    parts: list[list[Pair]] = [[] for _ in fractions]
    for p in pairs:
        parts[part_of.get(p.group, len(fractions) - 1)].append(p)
    return parts
