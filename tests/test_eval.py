"""``ragserve eval`` on a slice of XQuAD with the real embedder and FAISS (and, for answers,
the session's one vLLM engine)."""

import orjson
import pytest
from typer.testing import CliRunner

from ragserve.cli.main import app
from ragserve.config import RAGConfig
from ragserve.errors import DatasetError, IndexMismatchError
from ragserve.eval.answers import sample_questions
from ragserve.eval.datasets import load_dataset
from ragserve.eval.evaluate import answer_metrics, evaluate
from ragserve.testing.embedders import sharing

from .conftest import write_beir_from_squad, write_squad_slice

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def squad8(tmp_path_factory):
    return write_squad_slice(tmp_path_factory.mktemp("eval") / "xquad8.json", 8)


def _quality(m):
    return {**{f"hit@{k}": v for k, v in m["hit"].items()}, **{f"recall@{k}": v for k, v in m["recall"].items()},
            "mrr10": m["mrr10"], "ndcg10": m["ndcg10"]}


def test_cli_eval_fp16_within_001_of_fp32_then_reuses_the_index(tmp_path, squad8, replay_embedder):
    args = ["eval", str(squad8), "--index", str(tmp_path / "idx"), "--json", str(tmp_path / "r.json")]
    with sharing(replay_embedder):  # the session's model, not one load per command
        first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    text = " ".join(first.output.split())
    assert "40 documents, 225 questions" in text and "hit@1" in text and "nDCG@10" in text and "built" in text
    report = orjson.loads((tmp_path / "r.json").read_bytes())
    served, exact = _quality(report["served"]), _quality(report["exact"])
    assert report["index"]["type"] == "flat-fp16" and not report["index"]["reused"]
    for name in served:
        assert abs(served[name] - exact[name]) <= 0.01, name
    assert served["hit@1"] >= 0.85 and served["hit@10"] >= 0.97  # XQuAD-en with MiniLM: 0.885 / 0.990
    assert report["served"]["search_ms"][0] > 0 and report["exact"]["retrieve_ms"][1] > 0
    assert len(report["per_question"]) == 225 and report["single_matches_batched"] >= 0.95

    with sharing(replay_embedder):
        again = CliRunner().invoke(app, [*args, "--max-questions", "20"])
    assert again.exit_code == 0, again.output
    second = orjson.loads((tmp_path / "r.json").read_bytes())
    assert second["index"]["reused"] and second["index"]["fingerprint"] == report["index"]["fingerprint"]
    assert second["dataset"]["questions"] == 20


@pytest.mark.parametrize("index_type", ["ivf-fp16", "hnsw-fp16"])
def test_approximate_types_within_001_of_fp32(tmp_path, squad8, replay_embedder, index_type):
    # 41 chunks in 4 lists; the default nprobe (16, capped at nlist) probes them all
    cfg = RAGConfig().replace(index={"index_type": index_type, "ivf_nlist": 4})
    report = evaluate(squad8, tmp_path / "idx", cfg, max_questions=80, embedder=replay_embedder)
    assert report.index["type"] == index_type and report.dataset["questions"] == 80
    assert report.index["search"] == ({"nprobe": 4} if index_type == "ivf-fp16" else {"ef_search": 128})
    served, exact = _quality(report.to_dict()["served"]), _quality(report.to_dict()["exact"])
    for name in served:
        assert abs(served[name] - exact[name]) <= 0.01, (name, report.index)


def test_nprobe_changes_without_a_rebuild(tmp_path, squad8, replay_embedder):
    cfg = RAGConfig().replace(index={"index_type": "ivf-fp16", "ivf_nlist": 4})
    wide = evaluate(squad8, tmp_path / "idx", cfg, max_questions=80, embedder=replay_embedder)
    narrow = evaluate(squad8, tmp_path / "idx", cfg.replace(index={"ivf_nprobe": 1}), max_questions=80,
                      embedder=replay_embedder)
    assert narrow.index["reused"] and narrow.index["fingerprint"] == wide.index["fingerprint"]
    assert narrow.index["search"] == {"nprobe": 1} and wide.index["search"] == {"nprobe": 4}
    # (the results themselves: test_index.py; here one list holds ~10 chunks, fewer than the
    # 20 the evaluation asks for, so every row is completed by an exhaustive search)


def test_beir_view_of_the_same_slice_gives_the_same_metrics(tmp_path, squad8, replay_embedder):
    beir = write_beir_from_squad(tmp_path / "beir8", 8)
    a = evaluate(beir, tmp_path / "b", max_questions=60, embedder=replay_embedder)
    b = evaluate(squad8, tmp_path / "s", max_questions=60, embedder=replay_embedder)
    assert a.dataset["kind"] == "beir" and b.dataset["kind"] == "squad"
    assert _quality(a.to_dict()["served"]) == pytest.approx(_quality(b.to_dict()["served"]))
    with pytest.raises(DatasetError, match="no gold answers"):
        evaluate(beir, tmp_path / "b", answers=True, embedder=replay_embedder)


def test_never_replaces_an_index_it_did_not_build(tmp_path, squad8, xquad_index, embedder):
    before = (xquad_index / "manifest.json").read_bytes()
    with pytest.raises(IndexMismatchError, match="not built by `ragserve eval`"):
        evaluate(squad8, xquad_index, embedder=embedder)
    assert (xquad_index / "manifest.json").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(IndexMismatchError, match="is not an index"):
        evaluate(squad8, tmp_path / "other", embedder=embedder)


@pytest.mark.engine
def test_answer_metrics_on_a_few_questions(rag, squad8):
    # The session engine serves the same 8 articles; a handful of questions keeps this short.
    questions = load_dataset(squad8).questions[:6]
    metrics, rows = answer_metrics(rag, questions, concurrency=6)
    assert metrics.questions == 6 and metrics.errors == 0
    assert all(r["answer"].strip() for r in rows)
    for value in (metrics.contains, metrics.exact_match, metrics.f1):
        assert 0.0 <= value <= 1.0
    assert metrics.exact_match <= metrics.contains  # an exact answer also contains itself
    assert all(len(r["baseline"].split()) == len(r["answer"].split()) for r in rows)
    assert 0.0 < metrics.grounded <= 1.0 and 0.0 <= metrics.ungrounded_share <= 1.0


def test_cli_errors_are_one_clean_line(tmp_path):
    missing = CliRunner().invoke(app, ["eval", str(tmp_path / "nope.json")])
    assert missing.exit_code == 1
    assert "[eval]" in missing.output and "no such file or folder" in " ".join(missing.output.split())
    bad = CliRunner().invoke(app, ["eval", str(tmp_path), "--index-type", "annoy"])
    assert bad.exit_code == 1 and "index.index_type" in bad.output


def test_cli_eval_answers_on_a_sample_reports_the_protocol(tmp_path, squad8, monkeypatch, replay_embedder):
    """`ragserve eval --answers --sample N --seed S` end to end through the CLI: the documented
    draw, every answer metric, a stable JSON. The answers come from the fake OpenAI server
    (the protocol does not depend on the model; the real engine's answers are scored in
    test_answer_metrics_on_a_few_questions)."""
    from ragserve.testing.fake_openai import FakeOpenAI
    from ragserve.testing.http import running

    out = tmp_path / "answers.json"
    with running(FakeOpenAI().app) as url, sharing(replay_embedder):
        for key, value in {"RAGSERVE_GENERATE_BACKEND": "openai", "RAGSERVE_OPENAI_URLS": url,
                           "RAGSERVE_OPENAI_TOKENIZER": "server", "RAGSERVE_GENERATE_MAX_TOKENS": "4"}.items():
            monkeypatch.setenv(key, value)
        run = CliRunner().invoke(app, ["eval", str(squad8), "--index", str(tmp_path / "i"), "--answers",
                                       "--sample", "6", "--seed", "3", "--json", str(out)])
    assert run.exit_code == 0, run.output
    text = " ".join(run.output.split())
    assert "contains a gold answer" in text and "cut at max_tokens" in text and "extractive baseline" in text
    assert "answers with an ungrounded number or name" in text
    report = orjson.loads(out.read_bytes())
    assert report["schema"] == "ragserve.eval/2"
    assert report["dataset"]["questions"] == 6 and report["dataset"]["sample"] == 6 and report["dataset"]["seed"] == 3
    drawn = sample_questions(load_dataset(squad8).questions, 6, 3)
    assert [r["qid"] for r in report["per_question"]] == [q.qid for q in drawn]
    a = report["answers"]
    assert a["questions"] == 6 and a["errors"] == 0 and a["empty_share"] == 0.0
    for key in ("contains", "exact_match", "f1", "cut_share", "baseline_contains", "baseline_exact_match",
                "baseline_f1", "grounded", "ungrounded_share"):
        assert 0.0 <= a[key] <= 1.0, key
    assert a["mean_words"] > 0
    assert all(isinstance(r["cut"], bool) for r in report["per_question"])
    for r in report["per_question"]:  # the baseline has each answer's length, from its top source
        assert len(r["baseline"].split()) == len(r["answer"].split()) and isinstance(r["ungrounded"], list)
