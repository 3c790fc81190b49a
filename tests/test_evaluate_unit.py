"""Answer scoring logic with a fake RAG (the real engine: test_eval.py)."""

import asyncio
import random

import pytest

from ragserve.eval.answers import sample_questions
from ragserve.eval.datasets import EvalQuestion
from ragserve.eval.evaluate import answer_metrics


class FakeRag:
    def __init__(self):
        self.in_flight = self.peak = 0

    async def aquery(self, question):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.005 if question != "q0" else 0.05)  # one slow request
        self.in_flight -= 1
        if question == "bad":
            raise RuntimeError("engine hiccup")

        class Result:
            answer = "It was the Denver Broncos."
            sources = []  # noqa: RUF012 - no sources: the baseline is empty, groundedness 0 found of 2
        return Result()


QUESTIONS = [EvalQuestion(str(i), "bad" if i == 3 else f"q{i}", {"d": 1}, ("Denver Broncos",)) for i in range(20)]


def test_requests_stay_in_flight_and_a_failure_scores_zero():
    rag, seen = FakeRag(), []
    metrics, rows = answer_metrics(rag, QUESTIONS, concurrency=4, progress=lambda *e: seen.append(e))
    assert rag.peak == 4  # the slow first request does not hold back the others
    assert metrics.questions == 20 and metrics.errors == 1
    assert metrics.contains == 19 / 20 and metrics.exact_match == 0.0
    # "it was denver broncos" vs "denver broncos": precision 2/4, recall 1 -> F1 2/3
    assert metrics.f1 == pytest.approx(19 / 20 * 2 / 3)
    assert rows[3]["error"] == "RuntimeError('engine hiccup')" and rows[3]["answer"] == ""
    assert seen[-1] == ("answers", 20, 20)


async def test_works_from_inside_a_running_event_loop():
    metrics, _ = answer_metrics(FakeRag(), QUESTIONS[:5], concurrency=2)
    assert metrics.questions == 5 and metrics.errors == 1


class ShapedRag:
    """Answers shaped by the question: one cut at max_tokens, one empty."""

    async def aquery(self, question):
        class Result:
            answer = {"cut": "Denver Broncos won and then won and", "empty": ""}.get(question, "Denver Broncos")
            finish_reason = "length" if question == "cut" else "stop"
            sources = []  # noqa: RUF012
        return Result()


def test_answer_shape_is_reported():
    qs = [EvalQuestion(str(i), text, {"d": 1}, ("Denver Broncos",)) for i, text in enumerate(["a", "cut", "empty", "b"])]
    metrics, rows = answer_metrics(ShapedRag(), qs, concurrency=2)
    assert metrics.cut_share == 0.25 and metrics.empty_share == 0.25
    assert metrics.mean_words == (2 + 7 + 0 + 2) / 4
    assert metrics.exact_match == 0.5 and metrics.contains == 0.75
    assert [r["cut"] for r in rows] == [False, True, False, False]


def test_the_sample_is_the_documented_draw():
    qs = [EvalQuestion(str(i), f"q{i}", {"d": 1}) for i in range(50)]
    assert sample_questions(qs, 10, seed=1) == random.Random(1).sample(qs, 10)
    assert sample_questions(qs, 10, seed=1) == sample_questions(qs, 10, seed=1)
    assert sample_questions(qs, 10, seed=2) != sample_questions(qs, 10, seed=1)
    assert sample_questions(qs, None) == qs and sample_questions(qs, 500) == qs
