"""The profiling toolkit's logic with fakes: workload shape, questions, stage shares,
cProfile across the pipeline's threads, the stats CLI. The real run: test_profiling.py."""

import json
import pstats

import orjson
import pytest

from ragserve.profiling.breakdown import breakdown, markdown, per_query_coverage
from ragserve.profiling.cprof import ThreadProfiler, attribute
from ragserve.profiling.workload import (
    QueryRecord,
    corpus_questions,
    file_questions,
    load_questions,
    plan,
    run_workload,
)
from ragserve.types import Chunk


@pytest.mark.parametrize("n,share", [(48, 0.25), (10, 0.0), (7, 0.5), (1, 0.9)])
def test_plan_has_exactly_the_repeats_asked_and_starts_new(n, share):
    slots = plan(n, share, seed=3)
    assert len(slots) == n and slots[0] is False
    assert sum(slots) == min(round(n * share), n - 1)


class Store:
    def __init__(self, chunks):
        self.chunks = chunks

    def __len__(self):
        return len(self.chunks)

    def get(self, i):
        return self.chunks[i]


def test_corpus_questions_come_from_headings_or_document_names():
    store = Store([Chunk(0, "with.txt", 'The "with" statement\n**********************\n\nText.'),
                   Chunk(1, "atom-literals.txt", "no heading here"),
                   Chunk(2, "x.txt", "Intro\n\nSub part\n=========\nbody")])
    qs = corpus_questions(store, 10, seed=1)
    assert len(qs) == len(set(qs)) == 3
    joined = " ".join(qs)
    assert "the \"with\" statement" in joined.lower() and "atom literals" in joined and "sub part" in joined


def test_file_questions_read_lines_and_squad_json(tmp_path):
    (tmp_path / "q.txt").write_text("# comment\nWhat is X?\n\n  Why Y? \n", "utf-8")
    assert file_questions(tmp_path / "q.txt") == ["What is X?", "Why Y?"]
    squad = {"data": [{"paragraphs": [{"qas": [{"question": "A?"}, {"question": "A?"}, {"question": "B?"}]}]}]}
    (tmp_path / "q.json").write_text(json.dumps(squad), "utf-8")
    assert file_questions(tmp_path / "q.json") == ["A?", "A?", "B?"]
    assert sorted(load_questions(str(tmp_path / "q.json"), None, 10)) == ["A?", "B?"]  # distinct keys only


def test_workload_repeats_answered_questions_as_cache_hits(fake_rag):  # noqa: F811
    pool = [f"question number {i}?" for i in range(20)]
    result = run_workload(fake_rag, pool, n=12, concurrency=4, repeat_share=0.25, seed=1)
    tiers = [r.tier for r in result.records]
    assert [r.index for r in result.records] == list(range(12))
    assert tiers.count("miss") == 9 and tiers.count("l1") == 3 and all(r.error is None for r in result.records)
    assert {r.question for r in result.records if r.repeat} <= {r.question for r in result.records if not r.repeat}
    # a second run has its own namespace: its first questions are misses again
    again = run_workload(fake_rag, pool, n=4, concurrency=2, repeat_share=0.0)
    assert {r.tier for r in again.records} == {"miss"} and again.namespace != result.namespace


def _record(tier, **t):
    return QueryRecord(0, "q", tier != "miss", tier, t, 0.0, 1.0)


def test_shares_add_to_one_and_generate_parts_sit_under_generate():
    records = [
        _record("miss", cache_l1=0.01, embed=20.0, search=1.0, docload=0.5, prompt=5.0, generate=900.0,
                generate_queue=10.0, generate_first_token=600.0, generate_decode=250.0, total=930.0),
        _record("miss", cache_l1=0.01, embed=10.0, search=1.0, docload=0.5, prompt=5.0, generate=1900.0,
                generate_queue=0.0, generate_first_token=1200.0, generate_decode=650.0, total=1920.0),
        _record("l1", cache_l1=0.002, total=0.02),
    ]
    groups = breakdown(records)
    assert list(groups) == ["miss", "l1"]
    miss = groups["miss"]
    assert sum(r.share for r in miss.top_level()) == pytest.approx(1.0)
    assert miss.share("generate") == pytest.approx(2800 / 2850)
    parts = [r for r in miss.rows if r.parent == "generate"]
    assert [r.stage for r in parts] == ["generate_queue", "generate_first_token", "generate_decode", "rest"]
    assert sum(r.share for r in parts) == pytest.approx(miss.share("generate"))
    assert miss.share("other") == pytest.approx((930 - 926.51 + 1920 - 1916.51) / 2850)
    assert groups["l1"].share("cache_l1") == pytest.approx(0.1) and groups["l1"].share("other") == pytest.approx(0.9)
    assert per_query_coverage(records[0].timings) == pytest.approx(926.51 / 930)
    text = markdown(groups)
    assert "first token (prefill)" in text and "| **total** |" in text


def test_thread_profiler_sees_the_embed_worker_and_attributes_stages(fake_rag, tmp_path):  # noqa: F811
    fake_rag.query("warm the worker thread")
    prof = ThreadProfiler(fake_rag)
    prof.start()
    try:
        fake_rag.query_batch([f"profiled {i}" for i in range(6)])
    finally:
        prof.stop()
    merged = prof.dump(tmp_path / "p.prof")
    names = {f[2] for f in pstats.Stats(str(tmp_path / "p.prof")).stats}  # type: ignore[attr-defined]
    # search runs in the embed worker thread, prompt and docload on the engine loop
    assert {"search", "get_many", "build", "_embed_search"} <= names
    assert {p.name for p in tmp_path.glob("p.*.prof")} >= {"p.engine-loop.prof", "p.ragserve-embed-0.prof"}
    groups = attribute(merged)
    assert {"search", "docload", "prompt", "cache_l1"} <= set(groups)  # the fake generator is no root
    search_funcs = [f for f, _, _ in groups["search"].functions]
    assert any("IndexScalarQuantizer_search" in f or "index.py" in f for f in search_funcs)
    assert prof.thread_times()["ragserve-embed-0"]["own_s"] > 0


def test_stats_cli_prints_a_saved_report(tmp_path, fake_rag):  # noqa: F811
    from typer.testing import CliRunner

    from ragserve.cli.main import app

    fake_rag.query("one")
    (tmp_path / "stats.json").write_bytes(orjson.dumps({"timed_pass": {"stages": fake_rag.stats()["stages"],
                                                                       "tiers": fake_rag.stats()["tiers"]},
                                                        "engine": fake_rag.stats()}))
    result = CliRunner().invoke(app, ["stats", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "generate" in result.output and "miss" in result.output and "in_flight" in result.output
    as_json = CliRunner().invoke(app, ["stats", str(tmp_path / "stats.json"), "--json"])
    assert orjson.loads(as_json.stdout)["tiers"]["miss"]["queries"] == 1
    missing = CliRunner().invoke(app, ["stats", str(tmp_path / "nothing")])
    assert missing.exit_code != 0


def test_advice_rules_quote_the_numbers_and_stay_silent_below_their_thresholds():
    from ragserve.profiling.bottleneck import rule_contention, rule_embed_queue, rule_generation

    def miss(**means):
        return {k: {"mean_ms": v, "share": v / 1000} for k, v in means.items()}

    base = {"cores": 2, "concurrency": 8, "top_k": 3, "max_tokens": 64, "miss_rps": 0.5,
            "prompt_tokens": 700.0, "completion_tokens": 60.0}
    prefill = {**base, "miss": miss(generate=900, **{"generate:generate_queue": 1, "generate:generate_first_token": 600,
                                                      "generate:generate_decode": 250})}
    assert "prefill dominates" in rule_generation(prefill) and "600 ms" in rule_generation(prefill)
    queued = {**base, "miss": miss(generate=900, **{"generate:generate_queue": 400,
                                                     "generate:generate_first_token": 300,
                                                     "generate:generate_decode": 150})}
    assert "44%" in rule_generation(queued) and "scheduler" in rule_generation(queued)
    assert rule_generation({**base, "miss": miss(generate=100, embed=900)}) is None  # generation is not the cost
    assert rule_embed_queue({**base, "miss": miss(embed_wait=30, embed=10)}).startswith("Queries wait 30.0 ms")
    assert rule_embed_queue({**base, "miss": miss(embed_wait=5, embed=10)}) is None
    busy = {"cores": 2, "cpu": {"whole machine": 190.0, "this process": 2.0, "VLLM::EngineCore": 54.0}}
    assert "134%" in rule_contention(busy)
    assert rule_contention({"cores": 2, "cpu": {"whole machine": 80.0, "VLLM::EngineCore": 70.0}}) is None
