"""``--json`` is for scripts: every command that prints JSON leaves it alone on stdout, with
the real engine (whose vLLM log lines, engine-core prints and library warnings go to stderr).
Each command runs in its own process, as a script runs it, and its whole stdout is parsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from ragserve.testing.redis import redis_server

pytestmark = [pytest.mark.engine, pytest.mark.redis]

ENV = {"RAGSERVE_GENERATE_MAX_TOKENS": "8", "RAGSERVE_VLLM_KV_CACHE_GIB": "1"}


def ragserve(*args: str, home: Path) -> subprocess.Popen:
    """The command, started, its stdout and stderr going to files in ``home`` (pipes left
    unread while another command is waited for could fill and block it); ``finished`` waits
    for it and reads them."""
    from ragserve.models.resolve import resolve_generation_model

    # A home of its own for the run's data; the model prepared in the user's home
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **ENV, "RAGSERVE_HOME": str(home),
           "RAGSERVE_GENERATE_MODEL": str(resolve_generation_model("default"))}
    env.pop("VLLM_LOGGING_STREAM", None)  # the command's choice, not the caller's
    with open(home / "stdout", "wb") as out, open(home / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ragserve.cli", *args], env=env, stdout=out,
                                stderr=err)
    proc.home = home  # type: ignore[attr-defined]
    return proc


def finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=600)
    finally:
        proc.kill()
    home = proc.home  # type: ignore[attr-defined]
    stdout = (home / "stdout").read_text(errors="replace")
    stderr = (home / "stderr").read_text(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]
    assert "vLLM" in stderr or "EngineCore" in stderr or "WARNING" in stderr, \
        "the engine's lines went nowhere: this test would not see them on stdout"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_query_stats_and_warm_write_only_json_to_stdout(xquad_index, xquad_corpus, tmp_path):
    # The three commands run at once, each in a home of its own: most of each one's time is a
    # process start (torch, MiniLM, vLLM's engine core), which two cores share well.
    q = xquad_corpus[1][5]["question"]
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(orjson.dumps({"question": x["question"]}) + b"\n" for x in xquad_corpus[1][6:8]))
    homes = {name: tmp_path / name for name in ("query", "stats", "warm")}
    with redis_server() as redis:
        procs = {"query": ragserve("query", str(xquad_index), q, "--json", home=homes["query"]),
                 "stats": ragserve("stats", str(xquad_index), "--questions", "4", "--concurrency", "2",
                                   "--json", home=homes["stats"]),
                 "warm": ragserve("warm", str(xquad_index), str(log), "--redis-url", redis.url, "--json",
                                  home=homes["warm"])}
        try:
            runs = {name: finished(p) for name, p in procs.items()}
        finally:
            for p in procs.values():
                p.kill()

    query = json.loads(runs["query"].stdout)
    assert query["answer"].strip() and query["sources"] and query["cache_tier"] == "miss"

    stats = json.loads(runs["stats"].stdout)
    assert sum(t["queries"] for t in stats["tiers"].values()) == 4 and "generate" in stats["stages"]

    warm = runs["warm"]
    assert len(warm.stdout.splitlines()) == 1, warm.stdout  # one JSON line; the summary went to stderr
    summary = json.loads(warm.stdout)
    assert (summary["total"], summary["warmed"], summary["failed"]) == (2, 2, 0)
    assert "distinct questions: warmed 2" in warm.stderr
