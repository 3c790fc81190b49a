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
    assert report["schema"] == "ragserve.eval/2"
    assert [(r["name"], r["report"]["config"]["top_k"]) for r in report["reports"]] == [("k1", 1), ("k3", 3)]
    assert len(gen.prompts) - before == 2 * 2  # two good questions, two configurations, nothing from the cache
    for run in (r["report"] for r in report["reports"]):
        assert run["schema"] == "ragserve.eval/2" and run["dataset"]["questions"] == 3
        assert run["dataset"]["kind"] == "questions" and run["dataset"]["labelled"] == 0
        a = run["answers"]
        assert set(a) == {f.name for f in dataclasses.fields(AnswerMetrics)}  # the CLI's answers object
        assert a["questions"] == 3 and a["errors"] == 1  # the blank question fails alone
        rows = run["per_question"]
        assert [row["qid"] for row in rows] == ["q-a", "1", "2"]
        assert all(set(row) == {"qid", "rank", "rank_exact", *ANSWER_ROW_KEYS} for row in rows)  # the CLI's rows
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


# -- the endpoint's reports are the CLI's --------------------------------------------------

TIMINGS = {("seconds",), ("served", "search_ms"), ("served", "retrieve_ms"), ("exact", "search_ms"),
           ("exact", "retrieve_ms"), ("answers", "seconds"), ("stages",)}
"""Paths of a report whose numbers are wall times: compared by shape (keys, lengths), not value."""


def _masked(value, path=()):
    """``value`` with every number under a timing path replaced by None (keys kept)."""
    timing = any(path[:len(t)] == t for t in TIMINGS)
    if isinstance(value, dict):
        return {k: _masked(v, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, path) for v in value]
    return None if timing and isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _source_words(prompt: str) -> str:
    """A fake model's answer that depends on the prompt: its last five capitalised words or
    numbers (the question's, the sources') and its length in words (how many sources)."""
    import re

    return " ".join([*re.findall(r"\b(?:[A-Z][a-z]+|\d+)\b", prompt)[-5:], str(len(prompt.split()))])


@pytest.mark.integration
def test_each_report_of_the_endpoint_is_what_ragserve_eval_json_writes(tmp_path, xquad_index, xquad_corpus,
                                                                       embedder, monkeypatch):
    """The same questions file and index through ``ragserve eval ... --answers --json`` (in
    process; the session's embedder instead of a second load of the same model) and through ``POST /admin/eval`` on a server over that index
    (cache on, bypassed): every key the same everywhere, every value the same but timings
    and where the questions came from (``dataset.path``). A generator whose answer depends
    on its prompt, so a configuration's ``top_k`` shows in the answers."""
    import orjson
    from typer.testing import CliRunner

    from ragserve import RAG
    from ragserve.cli.main import app

    _, qs = xquad_corpus
    picked = qs[::40]  # six questions over the eight articles
    questions = [{"id": f"q{i}", "question": q["question"], "answers": q["answers"], "relevant": [q["doc_id"]]}
                 for i, q in enumerate(picked)]
    questions.append({"id": "free", "question": "Who rules the kingdom?", "answers": ["the king"]})  # unlabelled
    body = {"name": "xquad-slice", "questions": questions}
    (tmp_path / "questions.json").write_bytes(orjson.dumps(body))
    monkeypatch.setattr("ragserve.generators.make_generator", lambda cfg: FakeGenerator(delay=0, answer=_source_words))
    monkeypatch.setattr("ragserve.retrieval.embed.SentenceTransformerEmbedder", lambda cfg: embedder)
    monkeypatch.setenv("RAGSERVE_PROMPT_MAX_SCORE_GAP", "0")  # every source retrieved goes into the prompt

    cli = {}
    for top_k in (1, 4):
        out = tmp_path / f"k{top_k}.json"
        run = CliRunner().invoke(app, ["eval", str(tmp_path / "questions.json"), "--index", str(xquad_index),
                                       "--answers", "--top-k", str(top_k), "--concurrency", "4", "--json", str(out)])
        assert run.exit_code == 0, run.output
        cli[top_k] = orjson.loads(out.read_bytes())

    config = RAGConfig().replace(server={"admin_key": ADMIN}, prompt={"max_score_gap": 0})
    gen = FakeGenerator(delay=0, answer=_source_words)
    with RAG.from_index(xquad_index, config, embedder=embedder, generator=gen) as rag, \
            running(create_app(rag, config)) as url:
        r = post(f"{url}/admin/eval", headers=AUTH, json={
            **body, "configs": [{"name": "k1", "top_k": 1}, {"name": "k4", "top_k": 4}], "concurrency": 4})
    assert r.status_code == 200, r.text
    served = r.json()
    assert served["schema"] == "ragserve.eval/2" and [e["name"] for e in served["reports"]] == ["k1", "k4"]

    for top_k, entry in zip((1, 4), served["reports"]):
        mine, theirs = cli[top_k], entry["report"]
        assert theirs["dataset"]["path"] is None and mine["dataset"]["path"] == str(tmp_path / "questions.json")
        mine["dataset"]["path"] = None
        assert _masked(theirs) == _masked(mine), top_k
        # ...and what was compared is a real report: the index against exact fp32, answers, stages
        assert theirs["schema"] == "ragserve.eval/2"
        assert theirs["config"] == {"top_k": top_k, "concurrency": 4, "model": None}
        assert theirs["index"]["exact_from"] == "re-embedded" and theirs["dataset"]["labelled"] == len(picked) == 6
        assert theirs["served"]["hit"]["10"] == 1.0 and theirs["exact"]["hit"]["1"] >= 0.5
        assert theirs["answers"]["questions"] == 7 and theirs["answers"]["errors"] == 0
        assert all(theirs["stages"][s]["count"] == 7 for s in ("embed", "search", "generate", "total"))
        assert theirs["per_question"][-1]["rank"] is None  # the unlabelled question
    # top_k reaches the answers: one source or four in the prompt, other words answered
    assert [r["answer"] for r in cli[1]["per_question"]] != [r["answer"] for r in cli[4]["per_question"]]


def test_an_unknown_model_without_models_fails_the_report_once_before_any_pass(tmp_path):
    """Without ``[models]`` the one served model's name is known only once the RAG is open:
    ``--model`` naming another fails the report there, not as an error row per question."""
    import asyncio

    from ragserve.errors import UnknownModelError
    from ragserve.eval.datasets import EvalQuestion
    from ragserve.eval.report import build_report

    gen = FakeGenerator()
    with make_rag(tmp_path, gen) as rag:
        questions = [EvalQuestion(f"q{i}", f"chunk number {i}", {f"doc{i}.txt": 1}, (f"chunk number {i}",))
                     for i in range(2)]
        with pytest.raises(UnknownModelError, match="'nope' is not served here"):
            asyncio.run(build_report(rag, questions, dataset={}, answers=True, model="nope"))
    assert not gen.prompts
