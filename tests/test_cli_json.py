"""``--json`` is for scripts: every command that prints JSON leaves it alone on stdout. Each
command runs in its own process, as a script runs it, and its whole stdout is parsed.

``query`` runs the real engine, whose vLLM log lines, engine-core prints and library warnings
must go to stderr. ``stats`` and ``warm`` go through the same switch of stdout
(``ragserve.cli.quiet.data_stdout``); they run over the fake OpenAI server, which saves two
engine starts (a minute each) and still shows that their own summaries and progress stay off
stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import orjson
import pytest

from ragserve.testing.fake_openai import FakeOpenAI
from ragserve.testing.http import running
from ragserve.testing.redis import redis_server

pytestmark = pytest.mark.redis

ENV = {"RAGSERVE_GENERATE_MAX_TOKENS": "8", "RAGSERVE_VLLM_KV_CACHE_GIB": "1"}


def ragserve(*args: str, home, fake_url: str | None = None) -> subprocess.CompletedProcess:
    """``ragserve ARGS`` in its own process: on the real engine, or on the fake OpenAI server
    at ``fake_url``."""
    from ragserve.models.resolve import resolve_generation_model

    # A home of its own for the run's data; the model prepared in the user's home
    env = {**os.environ, **ENV, "RAGSERVE_HOME": str(home),
           "RAGSERVE_GENERATE_MODEL": str(resolve_generation_model("default"))}
    if fake_url:
        env.update({"RAGSERVE_GENERATE_BACKEND": "openai", "RAGSERVE_OPENAI_URLS": fake_url,
                    "RAGSERVE_OPENAI_TOKENIZER": "server"})
    env.pop("VLLM_LOGGING_STREAM", None)  # the command's choice, not the caller's
    run = subprocess.run([sys.executable, "-m", "ragserve.cli", *args], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    if not fake_url:
        assert "vLLM" in run.stderr or "EngineCore" in run.stderr or "WARNING" in run.stderr, \
            "the engine's lines went nowhere: this test would not see them on stdout"
    return run


@pytest.mark.engine
def test_query_writes_only_json_to_stdout_with_the_engine_on_stderr(xquad_index, xquad_corpus, tmp_path):
    q = xquad_corpus[1][5]["question"]
    query = json.loads(ragserve("query", str(xquad_index), q, "--json", home=tmp_path).stdout)
    assert query["answer"].strip() and query["sources"] and query["cache_tier"] == "miss"


@pytest.mark.integration
def test_stats_and_warm_write_only_json_to_stdout(xquad_index, xquad_corpus, tmp_path):
    fake = FakeOpenAI()
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(orjson.dumps({"question": x["question"]}) + b"\n" for x in xquad_corpus[1][6:8]))
    with running(fake.app) as url, redis_server() as redis:
        stats = json.loads(ragserve("stats", str(xquad_index), "--questions", "4", "--concurrency", "2", "--json",
                                    home=tmp_path, fake_url=url).stdout)
        warm = ragserve("warm", str(xquad_index), str(log), "--redis-url", redis.url, "--json", home=tmp_path,
                        fake_url=url)
    assert sum(t["queries"] for t in stats["tiers"].values()) == 4 and "generate" in stats["stages"]
    assert len(warm.stdout.splitlines()) == 1, warm.stdout  # one JSON line; the summary went to stderr
    summary = json.loads(warm.stdout)
    assert (summary["total"], summary["warmed"], summary["failed"]) == (2, 2, 0)
    assert "distinct questions: warmed 2" in warm.stderr
