"""``--json`` is for scripts: every command that prints JSON leaves it alone on stdout, with
the real engine (whose vLLM log lines, engine-core prints and library warnings go to stderr).
Each command runs in its own process, as a script runs it, and its whole stdout is parsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import orjson
import pytest

from ragserve.testing.redis import redis_server

pytestmark = [pytest.mark.engine, pytest.mark.redis]

ENV = {"RAGSERVE_GENERATE_MAX_TOKENS": "8", "RAGSERVE_VLLM_KV_CACHE_GIB": "1"}


def ragserve(*args: str, home) -> subprocess.CompletedProcess:
    from ragserve.models.resolve import resolve_generation_model

    # A home of its own for the run's data; the model prepared in the user's home
    env = {**os.environ, **ENV, "RAGSERVE_HOME": str(home),
           "RAGSERVE_GENERATE_MODEL": str(resolve_generation_model("default"))}
    env.pop("VLLM_LOGGING_STREAM", None)  # the command's choice, not the caller's
    run = subprocess.run([sys.executable, "-m", "ragserve.cli", *args], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "vLLM" in run.stderr or "EngineCore" in run.stderr or "WARNING" in run.stderr, \
        "the engine's lines went nowhere: this test would not see them on stdout"
    return run


def test_query_stats_and_warm_write_only_json_to_stdout(xquad_index, xquad_corpus, tmp_path):
    q = xquad_corpus[1][5]["question"]
    query = json.loads(ragserve("query", str(xquad_index), q, "--json", home=tmp_path).stdout)
    assert query["answer"].strip() and query["sources"] and query["cache_tier"] == "miss"

    stats = json.loads(ragserve("stats", str(xquad_index), "--questions", "4", "--concurrency", "2", "--json",
                                home=tmp_path).stdout)
    assert sum(t["queries"] for t in stats["tiers"].values()) == 4 and "generate" in stats["stages"]

    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(orjson.dumps({"question": x["question"]}) + b"\n" for x in xquad_corpus[1][6:8]))
    with redis_server() as redis:
        warm = ragserve("warm", str(xquad_index), str(log), "--redis-url", redis.url, "--json", home=tmp_path)
    assert len(warm.stdout.splitlines()) == 1, warm.stdout  # one JSON line; the summary went to stderr
    summary = json.loads(warm.stdout)
    assert (summary["total"], summary["warmed"], summary["failed"]) == (2, 2, 0)
    assert "distinct questions: warmed 2" in warm.stderr
