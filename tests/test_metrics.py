"""Metric functions against values computed by hand."""

import math

import pytest

from ragserve.eval.scoring import (
    contains_answer,
    dedupe,
    exact_match,
    hit_at,
    mrr_at,
    ndcg_at,
    normalize_answer,
    overlap_at,
    percentile,
    recall_at,
    token_f1,
)

RANKED = ["d4", "d2", "d9", "d1", "d7"]


def test_hit_recall_mrr_on_one_relevant_document():
    rel = {"d9": 1}  # rank 3
    assert [hit_at(RANKED, rel, k) for k in (1, 2, 3, 10)] == [0.0, 0.0, 1.0, 1.0]
    assert [recall_at(RANKED, rel, k) for k in (1, 3)] == [0.0, 1.0]
    assert mrr_at(RANKED, rel, 10) == pytest.approx(1 / 3)
    assert mrr_at(RANKED, rel, 2) == 0.0
    assert mrr_at(RANKED, {"nowhere": 1}, 10) == 0.0


def test_recall_with_several_relevant_documents_and_zero_grades():
    rel = {"d2": 1, "d7": 2, "d8": 1, "d4": 0}  # d4 judged not relevant
    assert recall_at(RANKED, rel, 2) == pytest.approx(1 / 3)   # d2 of {d2, d7, d8}
    assert recall_at(RANKED, rel, 5) == pytest.approx(2 / 3)   # d2, d7
    assert hit_at(RANKED, rel, 1) == 0.0                       # d4 has grade 0
    assert mrr_at(RANKED, rel, 10) == 0.5
    assert recall_at(RANKED, {}, 5) == 0.0


def test_ndcg_by_hand():
    # one relevant document at rank 3: DCG = 1/log2(4) = 0.5, ideal = 1/log2(2) = 1
    assert ndcg_at(RANKED, {"d9": 1}, 10) == pytest.approx(0.5)
    # graded: d2 (grade 2) at rank 2, d7 (grade 1) at rank 5, d8 (grade 1) not retrieved
    dcg = 2 / math.log2(3) + 1 / math.log2(6)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at(RANKED, {"d2": 2, "d7": 1, "d8": 1}, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at(RANKED, {"d4": 1}, 10) == 1.0
    assert ndcg_at(RANKED, {"d7": 1}, 3) == 0.0
    assert ndcg_at(RANKED, {}, 10) == 0.0


def test_dedupe_overlap_percentile():
    assert dedupe(["a", "b", "a", "c", "b"]) == ["a", "b", "c"]
    assert overlap_at([1, 2, 3, 4], [4, 3, 9, 8], 4) == 0.5
    assert overlap_at([1, 2], [2, 1, 5], 2) == 1.0
    assert overlap_at([1], [], 10) == 1.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([], 50) == 0.0


def test_squad_normalisation():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_exact_match_f1_contains():
    golds = ["Denver Broncos", "the Broncos"]
    assert exact_match("the denver broncos.", golds) == 1.0
    assert exact_match("Broncos won", golds) == 0.0
    # "Broncos won" vs "broncos": precision 1/2, recall 1/1 -> F1 2/3
    assert token_f1("Broncos won", golds) == pytest.approx(2 / 3)
    # "the Panthers beat the Broncos" -> [panthers, beat, broncos] vs [denver, broncos]: p 1/3, r 1/2 -> 0.4
    assert token_f1("the Panthers beat the Broncos", ["Denver Broncos"]) == pytest.approx(0.4)
    assert token_f1("nothing in common", golds) == 0.0
    assert contains_answer("It was the Denver Broncos, in 2016.", golds) == 1.0
    assert contains_answer("in 1990", ["1"]) == 0.0  # whole words only
    assert contains_answer("in 1990", ["1990"]) == 1.0
    assert contains_answer("anything", ["The"]) == 0.0  # normalises to empty: never matches
