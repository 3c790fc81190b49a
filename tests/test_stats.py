"""Per-stage statistics, gauges and the stage layout (unit tests: fakes, no models)."""

import threading

import numpy as np
import orjson
import pytest

from ragserve.observe.timing import Gauges, StageStats, stage_layout
from ragserve.types import Timings


def test_summary_percentiles_match_numpy_over_the_window():
    rng = np.random.default_rng(0)
    values = rng.exponential(10.0, 500)
    stats = StageStats(window=300)
    for v in values:
        stats.record({"embed": float(v), "total": float(v) * 2}, "miss")
    s = stats.summary()["embed"]
    window = values[-300:]
    assert s["count"] == 300
    assert s["mean_ms"] == pytest.approx(window.mean(), abs=1e-3)
    for p in (50, 95, 99):
        assert s[f"p{p}_ms"] == pytest.approx(np.percentile(window, p), abs=1e-3)
    assert stats.recorded == 500


def test_tiers_give_each_tier_its_share_and_latency():
    stats = StageStats()
    for _ in range(6):
        stats.record({"cache_l1": 0.001, "total": 0.02}, "l1")
    for _ in range(2):
        stats.record({"cache_l1": 0.001, "cache_l2": 0.5, "total": 1.0}, "l2")
    for _ in range(2):
        stats.record({"embed": 10.0, "generate": 900.0, "total": 1000.0}, "miss")
    tiers = stats.tiers()
    assert {k: v["share"] for k, v in tiers.items()} == {"l1": 0.6, "l2": 0.2, "miss": 0.2}
    assert tiers["miss"]["total"]["p50_ms"] == 1000.0 and tiers["l1"]["queries"] == 6
    # a stage is summarised over the queries that ran it, never padded with zeros
    assert stats.summary()["embed"]["count"] == 2 and stats.summary()["cache_l1"]["count"] == 8


def test_record_is_safe_from_many_threads():
    stats = StageStats(window=100_000)

    def work():
        for _ in range(2000):
            stats.record({"total": 1.0}, "l1")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.recorded == 16_000 and stats.summary()["total"]["count"] == 16_000


def test_gauges_count_current_and_peak_and_survive_exceptions():
    g = Gauges("in_flight", "queued")
    g.inc("in_flight")
    g.inc("in_flight")
    g.dec("in_flight")
    with pytest.raises(RuntimeError):
        with g.track("queued"):
            assert g.value("queued") == 1
            raise RuntimeError("boom")
    assert g.snapshot() == {"in_flight": {"current": 1, "peak": 2}, "queued": {"current": 0, "peak": 1}}


def test_stage_layout_is_read_from_timings():
    stages, parts = stage_layout()
    assert parts == {"generate": ["generate_queue", "generate_first_token", "generate_decode"]}
    assert "total" not in stages and "embed_wait" in stages
    assert stages.index("cache_l1") < stages.index("embed") < stages.index("generate")
    assert set(stages) | {p for ps in parts.values() for p in ps} | {"total"} == set(Timings().as_dict())


def test_rag_stats_are_json_with_tiers_and_gauges(fake_rag):  # noqa: F811
    fake_rag.query("which chunk?")
    fake_rag.query("which chunk?")
    fake_rag.admission.max_in_flight = 1  # the batch's other four wait for the admission slot
    fake_rag.query_batch([f"q{i}" for i in range(5)])
    stats = orjson.loads(orjson.dumps(fake_rag.stats()))
    assert stats["tiers"]["miss"]["queries"] == 6 and stats["tiers"]["l1"]["queries"] == 1
    assert stats["gauges"]["in_flight"] == {"current": 0, "peak": 5}
    assert stats["gauges"]["queued"] == {"current": 0, "peak": 4}
    for stage in ("embed_wait", "embed", "search", "docload", "prompt", "generate", "total"):
        assert set(stats["stages"][stage]) == {"count", "mean_ms", "p50_ms", "p95_ms", "p99_ms"}
    assert stats["window"] == 10_000
