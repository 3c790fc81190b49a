"""Calibration of the semantic tier: the statistics, Learn-then-Test's decisions, the pairs,
and `ragserve calibrate-semantic` on a small real set with the real embedder."""

import json

import numpy as np
import pytest

from ragserve.config import RAGConfig
from ragserve.errors import CalibrationError
from ragserve.eval.calibrate import (
    GRID,
    ScoredPairs,
    binomial_pvalue,
    calibrate_pairs,
    clopper_pearson,
    learn_then_test,
    write_semantic_config,
)
from ragserve.eval.paraphrases import Pair, build_pairs, negated, rewrites, split_by_group


def test_the_statistics_match_the_known_figures():
    # With 0 errors, 299 served hits certify <= 1% at 95% (473 with 1 error): DESIGN.md.
    assert clopper_pearson(299, 0, 0.95)[1] <= 0.01 < clopper_pearson(298, 0, 0.95)[1]
    assert clopper_pearson(473, 1, 0.95)[1] <= 0.01
    assert binomial_pvalue(299, 0, 0.01) <= 0.05 < binomial_pvalue(298, 0, 0.01)
    assert binomial_pvalue(0, 0, 0.01) == 1.0
    lo, hi = clopper_pearson(100, 10, 0.95, two_sided=True)
    assert lo < 0.1 < hi


def synthetic(n_right, n_wrong, right_sim, wrong_sim, group0=0):
    pairs = [Pair(f"c{i}", f"n{i}", True, "rewrite", group0 + i) for i in range(n_right)]
    pairs += [Pair(f"c{i}", f"w{i}", False, "diff_answer", group0 + i) for i in range(n_wrong)]
    sims = np.array([right_sim] * n_right + [wrong_sim] * n_wrong, np.float32)
    ok = np.ones(len(pairs), bool)
    return ScoredPairs(pairs, sims, {"off": ok, "entities": ok, "strict": ok})


def test_ltt_certifies_the_most_permissive_threshold_before_errors():
    tune = synthetic(400, 400, 0.95, 0.80)
    cal = synthetic(400, 400, 0.95, 0.80)
    t, trace = learn_then_test(tune, cal, "off", 0.01, 0.05)
    assert t == 0.805  # every grid threshold above the wrong pairs' 0.80
    assert trace[-1]["threshold"] == 0.8 and trace[-1]["p_value"] > 0.05


def test_ltt_refuses_when_too_few_pairs_are_served():
    tune, cal = synthetic(200, 400, 0.95, 0.80), synthetic(200, 400, 0.95, 0.80)
    t, trace = learn_then_test(tune, cal, "off", 0.01, 0.05)
    assert t is None and len(trace) == 1  # 200 clean hits cannot certify 1%; the sequence stops


def test_an_uncertified_report_writes_nothing(tmp_path):
    scored = synthetic(100, 300, 0.95, 0.96)
    report = calibrate_pairs(scored, alpha=0.01, delta=0.05, guard="off")
    assert not report.certified and report.threshold is None
    cfg = tmp_path / "ragserve.toml"
    cfg.write_text("[query]\ntop_k = 3\n")
    with pytest.raises(CalibrationError):
        write_semantic_config(cfg, report)
    assert cfg.read_text() == "[query]\ntop_k = 3\n"


def test_pairs_rules_and_labels(tmp_path):
    assert "Can you tell me who founded the company?" in rewrites("Who founded the company?")
    assert "When did the war end" in rewrites("When did the war end?")
    assert negated("When did the war end?") == "When did not the war end?"
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [
        {"id": "1", "question": "Who won in 1990?", "answers": [{"text": "Smith", "answer_start": 0}]},
        {"id": "2", "question": "Which player won in 1990?", "answers": [{"text": "John Smith", "answer_start": 0}]},
        {"id": "3", "question": "Who lost in 1990?", "answers": [{"text": "Jones", "answer_start": 0}]},
        {"id": "4", "question": "Which team scored first?", "answers": [{"text": "Jones", "answer_start": 0}]}]}]}]}))
    pairs = build_pairs(path)
    kinds = {(p.cached, p.new): (p.kind, p.right) for p in pairs}
    assert kinds[("Who lost in 1990?", "Which team scored first?")] == ("same_answer", True)
    assert kinds[("Who won in 1990?", "Who lost in 1990?")] == ("diff_answer", False)
    # Containment is neither: "Smith" / "John Smith" is no clean negative.
    assert ("Who won in 1990?", "Which player won in 1990?") not in kinds
    assert any(p.kind == "number" and not p.right for p in pairs)
    a, b = split_by_group(pairs + [Pair("x", "y", True, "rewrite", 7)], (0.5, 0.5))
    assert {p.group for p in a}.isdisjoint({p.group for p in b})


@pytest.mark.integration
def test_calibrate_semantic_on_a_small_real_set(tmp_path, embedder, monkeypatch):
    from typer.testing import CliRunner

    import ragserve.eval.calibrate as calibrate
    from ragserve.cli import app
    from tests.conftest import xquad_articles

    path = tmp_path / "small.json"
    path.write_text(json.dumps({"data": xquad_articles(3)}))
    real, memo = calibrate.calibrate_semantic, {}

    class Once:  # the session's embedder, each text embedded once across the two runs
        identity = embedder.identity

        def encode(self, texts):
            todo = [t for t in texts if t not in memo]
            if todo:
                memo.update(zip(todo, embedder.encode(todo), strict=True))
            return np.stack([memo[t] for t in texts])

    monkeypatch.setattr(calibrate, "calibrate_semantic", lambda *a, **k: real(*a, **{**k, "embedder": Once()}))
    cfg = tmp_path / "ragserve.toml"
    runner = CliRunner()
    # A few hundred pairs cannot certify 1%: refused, exit 1, nothing written.
    r = runner.invoke(app, ["calibrate-semantic", str(path), "--write", str(cfg)])
    assert r.exit_code == 1 and "stays off" in r.output and not cfg.exists()
    # 20% can be certified on them: the threshold comes from the grid and turns the tier on.
    r = runner.invoke(app, ["calibrate-semantic", str(path), "--alpha", "0.2", "--write", str(cfg),
                            "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "[semantic] written to" in r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["certified"] and report["threshold"] in GRID
    assert report["calibration"]["p_value"] <= 0.05 and report["test"]["served_hits"] > 0
    assert report["test"]["upper_bound"] >= report["test"]["false_hit_rate"]
    loaded = RAGConfig.load(cfg)
    assert loaded.semantic.enabled and loaded.semantic.threshold == report["threshold"]
    assert loaded.semantic.calibrated_model == embedder.identity["name"]
