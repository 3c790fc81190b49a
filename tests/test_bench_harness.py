"""``benchmarks/harness.py``, what the benchmarks share: the one percentile rule (with "not
measured" for no data), closed loops that keep C in flight, streamed answers read over HTTP
and in process, servers started on loopback and stopped with SIGTERM, CPU-seconds by
process, and report files."""

import asyncio
import json
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from ragserve.config import RAGConfig
from ragserve.eval.scoring import percentile
from ragserve.server.app import create_app
from ragserve.testing.fakes import FakeGenerator, fake_rag
from ragserve.testing.http import running

from .conftest import load_benchmark

harness = load_benchmark("harness")


def test_pct_is_the_packages_rule_and_nan_for_no_data():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0, 50, 95, 99, 100):
        assert harness.pct(values, q) == percentile(values, q)
        assert harness.pct(np.array(values), q) == pytest.approx(float(np.percentile(values, q)))
    assert harness.pcts(values, 50, 99) == (harness.pct(values, 50), harness.pct(values, 99))
    assert np.isnan(harness.pct([], 50)) and np.isnan(harness.pct(np.array([]), 95))
    assert harness.fmt(float("nan"), ".1f") == harness.fmt(None, ".1f") == "—"
    assert harness.fmt(np.float64(2.345), ".2f") == "2.35"


async def test_run_clients_keeps_c_in_flight_and_takes_every_item_once():
    seen, flight = [], {"now": 0, "peak": 0}

    async def one(i):
        flight["now"] += 1
        flight["peak"] = max(flight["peak"], flight["now"])
        await asyncio.sleep(0.01)
        seen.append(i)
        flight["now"] -= 1

    wall = await harness.run_clients(range(20), 4, one)
    assert sorted(seen) == list(range(20)) and flight["peak"] == 4 and wall > 0.04


@pytest.mark.http
def test_streamed_answers_over_http_and_in_process_add_up(tmp_path):
    rag = fake_rag(tmp_path, FakeGenerator(words=4))

    async def ask(url):
        async with harness.http_client(url, timeout=30) as client:
            ttft, tokens, done = await harness.stream_query(client, {"question": "what does chunk 1 say?"})
            assert ttft is not None and "".join(json.loads(t)["text"] for t in tokens) == done["answer"]
            assert done["timings"]["total"] > 0 and "completion_tokens" in done["usage"]
            assert (await harness.post_ok(client, "/v1/query", {"question": "again?"}))["answer"]
            with pytest.raises(RuntimeError, match="HTTP 4"):
                await harness.post_ok(client, "/v1/query", {"question": ""})
        ttft, parts, result = await harness.stream_inprocess(rag, "what does chunk 2 say?")
        assert ttft is not None and "".join(parts) == result.answer

    with rag, running(create_app(rag, RAGConfig())) as url:
        asyncio.run(ask(url))


def test_launch_waits_for_the_ready_file_and_stop_drains_with_sigterm(tmp_path):
    server = ("import pathlib, signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\n"
              "pathlib.Path(sys.argv[1]).write_text('4242')\n"
              "print('up', flush=True)\n"
              "time.sleep(60)\n")
    ready, log = tmp_path / "port", tmp_path / "server.log"
    proc, url = harness.launch([sys.executable, "-c", server, str(ready)], env={}, log=log, ready=ready, timeout_s=30)
    assert url == "http://127.0.0.1:4242" and proc.pid in harness.process_tree(proc.pid)
    status, seconds = harness.stop(proc, 30)
    assert status == 3 and seconds < 30 and harness.tail(log) == "up"
    with pytest.raises(SystemExit, match="stand-in did not start"):
        harness.launch([sys.executable, "-c", "print('no port')"], env={}, log=log, ready=tmp_path / "never",
                       timeout_s=30, what="the stand-in")


def test_cpu_sampler_counts_this_process(tmp_path):
    sampler = harness.CpuSampler(lambda pid: "me")
    a = sampler.snapshot()
    sum(i * i for i in range(2_000_000))
    d = sampler.delta(a, sampler.snapshot())
    assert d["procs"]["me"] > 0 and d["ours_s"] == d["procs"]["me"] and d["wall_s"] > 0


@dataclass
class _Row:
    name: str
    value: float


def test_write_report_writes_markdown_and_plain_json(tmp_path, capsys):
    data = {"row": _Row("a", 1.5), "n": np.int64(3), "xs": np.array([1.0, 2.0]), "path": tmp_path}
    harness.write_report("# title\n| a |", tmp_path / "out" / "r.md", tmp_path / "out" / "r.json", data)
    assert (tmp_path / "out" / "r.md").read_text() == "# title\n| a |\n"
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == {
        "row": {"name": "a", "value": 1.5}, "n": 3, "xs": [1.0, 2.0], "path": str(tmp_path)}
    assert "# title" in capsys.readouterr().out
    harness.write_report("quiet", None, None, echo=False)
    assert capsys.readouterr().out == ""
