"""CI's size of the headline benchmark (``benchmarks/bench_headline.py``): a Zipf stream of a few
dozen questions through a real ``ragserve serve`` (real vLLM, real Redis started by the
benchmark), with the answer cache on and off, and the report's own checks read back.

The peers (LangChain + Redis cache, LlamaIndex) live outside the project's lock and start a
second vLLM server: they are left out here (``make bench-deps`` and the full command in the
README run them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_squad_slice

pytestmark = [pytest.mark.engine, pytest.mark.http, pytest.mark.redis]
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_headline.py"


def test_small_headline_run_reports_fidelity_and_generations(xquad_index, tmp_path):
    out = tmp_path / "headline"
    # One source per prompt, 12 tokens, the questions of 3 articles (so the stream repeats
    # more): what the test checks is the cache's bookkeeping, and on this CPU a miss's prefill
    # is most of its cost (3:24 → about 2:00 of wall time against top_k 3, 16 tokens, 8 articles).
    env = {**os.environ, "RAGSERVE_VLLM_KV_CACHE_GIB": "1", "RAGSERVE_QUERY_TOP_K": "1"}
    cmd = [sys.executable, str(SCRIPT), "--index", str(xquad_index), "--questions",
           str(write_squad_slice(tmp_path / "slice.json", 3)), "--n", "24", "--concurrency", "8",
           "--max-tokens", "12", "--systems", "ragserve,ragserve-nocache", "--out", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {r["system"]: r for r in report["rows"]}
    on, off = rows["ragserve"], rows["ragserve-nocache"]
    assert on["requests"] == off["requests"] == 24 and on["errors"] == off["errors"] == 0
    # The cache: each distinct question generated exactly once (counted by vLLM), never again
    # after its answer came back, and every cached answer is the one that was stored.
    assert on["generations"] == on["distinct_questions"], on
    assert on["fidelity"]["regenerated_after_answer"] == 0
    assert on["fidelity"]["compared"] == on["fidelity"]["served_from_cache"] > 0
    assert on["fidelity"]["identical"] == on["fidelity"]["compared"]
    assert on["fidelity"]["inconsistent_questions"] == 0  # every client got the same answer to a question
    # Without it, every request that did not join a running generation ran one.
    assert off["generations"] == off["tiers"].get("miss", 0) > on["generations"]
    assert "l1" not in off["tiers"] and "l2" not in off["tiers"]
    assert on["quality"]["pairs"] > 0
    assert (out / "latency_cdf.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "hardware:" in md and "| ragserve |" in md and "contains-gold" in md
