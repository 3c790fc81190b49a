"""``POST /admin/eval`` against a real server on loopback over fakes: configurations compared
on the caller's questions, scored as ``ragserve eval --answers`` scores them."""

import dataclasses

import pytest

from ragserve.config import RAGConfig
from ragserve.eval.answers import ANSWER_ROW_KEYS, AnswerMetrics
from ragserve.server.app import create_app
from ragserve.testing.fakes import FakeGenerator
from ragserve.testing.fakes import fake_rag as make_rag
from ragserve.testing.http import post, running

pytestmark = pytest.mark.http

ADMIN = "admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
QUESTIONS = [{"question": "which chunk is first?", "answers": ["answer"], "id": "q-a"},
             {"question": "chunk number 3?", "answers": ["chunk number 3", "nowhere"]},
             {"question": "   ", "answers": ["x"]}]


@pytest.fixture
def served(tmp_path):
    gen = FakeGenerator(words=4)
    rag = make_rag(tmp_path, gen, server={"admin_key": ADMIN})
    with rag, running(create_app(rag, rag.config)) as url:
        yield url, gen


def test_each_configuration_is_answered_past_the_cache_and_scored_like_the_cli(served):
    url, gen = served
    post(f"{url}/v1/query", json={"question": "which chunk is first?"})  # now cached: eval must not read it
    top = post(f"{url}/v1/retrieve", json={"question": QUESTIONS[1]["question"], "top_k": 1}).json()["sources"][0]
    questions = [QUESTIONS[0], {**QUESTIONS[1], "answers": [top["text"], "nowhere"]}, QUESTIONS[2]]
    before = len(gen.prompts)
    r = post(f"{url}/admin/eval", headers=AUTH, json={
        "questions": questions, "configs": [{"name": "k1", "top_k": 1}, {"name": "k3", "top_k": 3}],
        "concurrency": 2})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["schema"] == "ragserve.eval-runs/1" and report["questions"] == 3
    assert [(run["name"], run["config"]["top_k"]) for run in report["runs"]] == [("k1", 1), ("k3", 3)]
    assert len(gen.prompts) - before == 2 * 2  # two good questions, two configurations, nothing from the cache
    for run in report["runs"]:
        a = run["answers"]
        assert set(a) == {f.name for f in dataclasses.fields(AnswerMetrics)}  # the CLI's answers object
        assert a["questions"] == 3 and a["errors"] == 1  # the blank question fails alone
        rows = run["per_question"]
        assert [row["qid"] for row in rows] == ["q-a", "1", "2"]
        assert all(set(row) == {"qid", *ANSWER_ROW_KEYS} for row in rows)
        assert rows[0]["contains"] == 1.0 and rows[0]["error"] is None  # "an answer more more" holds "answer"
        assert "EmptyQuestionError" in rows[2]["error"] and rows[2]["answer"] == ""
        # a window of the answer's length (4 words) of the top source ("chunk number N", 3 words): all of it
        assert rows[1]["baseline"] == top["text"] and rows[1]["baseline_contains"] == 1.0
        assert abs(a["contains"] - 1 / 3) < 1e-9 and abs(a["baseline_contains"] - 1 / 3) < 1e-9
        assert {"generate", "total"} <= set(run["stages"])
        assert all(s["p50_ms"] <= s["p95_ms"] for s in run["stages"].values())


def test_the_admin_key_comes_before_the_body_and_bad_bodies_name_the_field(served):
    url, gen = served
    assert post(f"{url}/admin/eval", json={"nonsense": 1}).status_code == 401
    bad_key = post(f"{url}/admin/eval", json={"questions": QUESTIONS}, headers={"Authorization": "Bearer nope"})
    assert bad_key.status_code == 401 and not gen.prompts
    dup = post(f"{url}/admin/eval", headers=AUTH, json={"questions": QUESTIONS[:1],
                                                        "configs": [{"name": "a"}, {"name": "a"}]})
    assert dup.status_code == 422 and "configs" in dup.json()["error"]["message"]
    for body, field in (({"questions": []}, "questions"), ({"questions": QUESTIONS, "concurrency": 0}, "concurrency"),
                        ({"questions": [{"question": "q", "answers": []}]}, "answers"),
                        ({"questions": QUESTIONS, "configs": [{"name": "a", "top_k": 0}]}, "top_k"),
                        ({"questions": QUESTIONS, "extra": 1}, "extra")):
        r = post(f"{url}/admin/eval", headers=AUTH, json=body)
        assert r.status_code == 422 and field in r.json()["error"]["message"], (body, r.text)
    assert not gen.prompts


def test_without_an_admin_key_the_route_is_off(tmp_path):
    rag = make_rag(tmp_path)
    with rag, running(create_app(rag, RAGConfig())) as url:
        r = post(f"{url}/admin/eval", headers=AUTH, json={"questions": QUESTIONS})
    assert r.status_code == 404 and "admin endpoints are off" in r.json()["error"]["message"]
