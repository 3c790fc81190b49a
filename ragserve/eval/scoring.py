"""Retrieval and answer metrics: small pure functions over ranked ids and strings.

Retrieval metrics take ``ranked`` (document ids, best first, already de-duplicated) and
``relevant`` (document id → graded relevance, > 0 means relevant), the shape of BEIR's
qrels; a SQuAD question has one relevant paragraph with grade 1.

nDCG uses linear gain (``rel / log2(rank + 1)``), as ``trec_eval`` and BEIR do. Answer
metrics follow the official SQuAD v1.1 script: lower case, punctuation and the articles
a/an/the removed, whitespace collapsed; a prediction is scored against its best gold answer.

**Usage:**

    hit_at(["p3", "p7"], {"p7": 1}, k=1)     # 0.0
    mrr_at(["p3", "p7"], {"p7": 1}, k=10)    # 0.5
    token_f1("in the Rhine valley", ["Rhine"])  # 0.5
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def dedupe(ids: Iterable[str]) -> list[str]:
    """First occurrence of each id, order kept (a document split into several chunks
    counts once, at its best rank).

    **Usage:** ``dedupe(["a", "b", "a"])`` → ``["a", "b"]``
    """
    return list(dict.fromkeys(ids))


def hit_at(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """1.0 if any relevant document is in the top ``k``, else 0.0."""
    return float(any(relevant.get(d, 0) > 0 for d in ranked[:k]))


def recall_at(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """Share of the relevant documents found in the top ``k`` (0.0 when none are relevant)."""
    wanted = {d for d, r in relevant.items() if r > 0}
    if not wanted:
        return 0.0
    return len(wanted.intersection(ranked[:k])) / len(wanted)


def mrr_at(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """1 / rank of the first relevant document within the top ``k``, else 0.0."""
    for rank, d in enumerate(ranked[:k], start=1):
        if relevant.get(d, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """Normalised discounted cumulative gain at ``k`` with linear gain."""
    dcg = sum(relevant.get(d, 0) / math.log2(rank + 1) for rank, d in enumerate(ranked[:k], start=1)
              if relevant.get(d, 0) > 0)
    ideal = sorted((r for r in relevant.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(rank + 1) for rank, r in enumerate(ideal, start=1))
    return dcg / idcg if idcg > 0 else 0.0


def overlap_at(ranked: Sequence[int | str], reference: Sequence[int | str], k: int) -> float:
    """Share of the reference's top ``k`` that ``ranked`` also has in its top ``k``: the
    recall@k of an approximate search against exact search."""
    ref = list(reference[:k])
    if not ref:
        return 1.0
    return len(set(ranked[:k]).intersection(ref)) / len(ref)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation); 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def token_f1(prediction: str, golds: Iterable[str]) -> float:
    """Best token-level F1 of the prediction against the gold answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if not pred or not ref:
            best = max(best, float(pred == ref))
        elif common:
            p, r = common / len(pred), common / len(ref)
            best = max(best, 2 * p * r / (p + r))
    return best


def contains_answer(prediction: str, golds: Iterable[str]) -> float:
    """1.0 if a normalised gold answer occurs in the normalised prediction as whole words
    (so "1" does not match inside "1990"). Empty gold answers never match."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(g and f" {g} " in pred for g in map(normalize_answer, golds)))
