"""The serving, HTTP and Ray benchmarks' report writers on made-up runs: what a full run
(minutes of vLLM) writes at its very end, checked in a second — every table, the machine
and versions at the top, the markdown and JSON files."""

import json
from argparse import Namespace
from types import SimpleNamespace

import pytest

from ragserve.config import RAGConfig

from .conftest import load_benchmark

harness = load_benchmark("harness")
report = load_benchmark("bench_serving_report")


def _cpu(wall=2.0):
    return {"wall_s": wall, "procs": {"bench process": 1.5, "VLLM::EngineCore": 2.5},
            "threads": {"MainThread": 0.4}, "ours_s": 4.0, "others_s": 0.3, "machine_s": 4.3}


def _run(system, c, n=4, stages=None):
    records = [report.Record(i, latency_s=0.5 + i / 10, answer=f"It is Paris {i}.", completion_tokens=8,
                             prompt_tokens=300, stages=dict(stages or {"generate": 400.0, "total": 450.0}))
               for i in range(n)]
    records[-1].error = "TimeoutError: "  # a failed request is reported, not fatal
    return report.Run(system, c, records, 2.0, [("Paris",)] * n, cpu=_cpu(), questions=[f"q{i}?" for i in range(n)])


@pytest.fixture(scope="module")
def machine():
    return harness.environment(gpu=False)


def test_serving_report(tmp_path, machine):
    bs = load_benchmark("bench_serving")
    args = Namespace(out=tmp_path, max_tokens=16, seed=0, per_level={2: 4}, warmup=1, rounds=1)
    sys_ = SimpleNamespace(n_chunks=10, embed_path="minilm", gen_path="qwen", start_s={"ragserve": 12.0},
                           peer_note="not measured (--skip-peer)", peer_skipped="--skip-peer",
                           check_lines=lambda runs: ["- checks"])
    runs = [_run("sequential", 1), _run("ragserve", 2), _run("raw vLLM", 2)]
    embed = {"concurrency": 32, "ratio": 5.5, "settings": {"batched": {"n": 64, "rate": 110.0, "p50_ms": 9.0,
                                                                       "p95_ms": 20.0}}}
    bs.write_report(args, machine, RAGConfig(), sys_, runs, embed, "indexes/xquad (existing)")
    md = (tmp_path / "serving_benchmark.md").read_text()
    assert "- hardware: " in md and "- versions: " in md and "- command: " in md
    assert "| ragserve | 2 | 4 | 1 |" in md and "3/3 (100%)" in md  # 3 answered, each with its gold
    assert "ragserve / raw vLLM, requests/s: **1.00**" in md and "ratio **5.50×**" in md
    data = json.loads((tmp_path / "serving_benchmark.json").read_text())
    assert data["summaries"][1]["p50_s"] == pytest.approx(0.6) and (tmp_path / "serving_benchmark.png").stat().st_size


def test_http_report(tmp_path, machine):
    bh = load_benchmark("bench_http")
    args = Namespace(out=tmp_path, index="indexes/xquad", max_tokens=16, per_level={2: 4})
    sys_ = SimpleNamespace(cfg=RAGConfig(), start_s={"ragserve serve": 20.0}, peer_note="skipped")
    stages = {"total": 400.0, "ttft_ms": 120.0, "outside_server_ms": 3.0}
    runs = [_run("in-process", 2, stages=stages), _run("HTTP native", 2, stages=stages)]
    extra = {"hits": [{"clients": 1, "requests": 10, "req_s": 900.0, "p50_ms": 1.1, "p99_ms": 2.0,
                       "server_p50_ms": 0.05, "tiers": {"l1": 10}}],
             "overload": {"sent": 128, "200": 8, "429": 120, "other": [], "p50_ms": 30.0, "max_ms": 60.0,
                          "server_p50_ms": 1.0, "server_p99_ms": 2.0, "server_max_ms": 3.0}}
    bh.write_report(args, machine, sys_, runs, extra)
    md = (tmp_path / "report.md").read_text()
    assert "**Machine**" in md and "| HTTP native | 2 | 4 | 1 |" in md and "0.12 | 0.12 | 3.00 / 3.00 |" in md
    assert "C=2: requests/s relative to in-process: HTTP native 1.000×" in md and "| 128 | 8 | 120 |" in md
    assert json.loads((tmp_path / "report.json").read_text())["overload"]["429"] == 120


def test_ray_report(tmp_path, machine):
    br = load_benchmark("bench_ray")
    args = Namespace(out=tmp_path, max_tokens=16, embed_threads=0, requests=10, concurrency=4, hot=2,
                     miss_requests=4, miss_concurrency=2, warmup=1)
    loops = [{"system": name, "workload": "L1 hits", "clients": 4, "requests": 10, "errors": {}, "req_s": rate,
              "p50_ms": 2.0, "p99_ms": 5.0, "server_cpu_ms": 1.0, "client_cpu_ms": 0.5, "tiers": {"l1": 10},
              "replicas": {}} for name, rate in (("serve", 500.0), ("ray", 250.0))]
    systems = {"serve": {"description": "ragserve serve", "start_s": 30.0, "threads": "—"}}
    br.write_report(args, machine, "indexes/xquad (existing)", systems, loops, [_run("serve", 2), _run("ray", 2)])
    md = (tmp_path / "report.md").read_text()
    assert "- hardware: " in md and "| serve | L1 hits | 4 | 10 |" in md
    assert "requests/s ray / serve = **0.50×**" in md and "(c) Ray generator deployment vs serve" in md
    assert json.loads((tmp_path / "report.json").read_text())["args"]["out"] == str(tmp_path)
