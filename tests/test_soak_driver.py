"""The soak's driver (``benchmarks/soak.py`` and its parts) for a few seconds against a server
over fakes: every kind sent and checked, the L1 answer cache sampled from ``/v1/stats``, the
RSS growth reported as it is, net of L1, and by pace. (Against the real engine, for ~40 s:
test_soak.py.)"""

import asyncio
import os

import pytest

from ragserve.config import RAGConfig
from ragserve.server.app import create_app
from ragserve.testing.fakes import FakeGenerator
from ragserve.testing.fakes import fake_rag as make_rag
from ragserve.testing.http import running

from .test_soak import load_soak

pytestmark = pytest.mark.http


def test_the_soak_driver_checks_every_kind_and_reports_memory_net_of_l1(tmp_path):
    soak = load_soak()
    rag = make_rag(tmp_path, FakeGenerator(words=4, delay=0.05))
    questions = [f"question {i}: what does chunk {i % 8} say?" for i in range(60)]
    settings = soak.Settings(duration_s=6, concurrency=6, warmup_s=2, period_s=3, sample_s=0.5, hot=4,
                             request_timeout_s=30)
    with rag, running(create_app(rag, RAGConfig())) as url:
        result = asyncio.run(soak.run(url, questions, settings, pid=os.getpid(), log=lambda m: None))
    assert not result.errors_500 and not result.unexpected, [(r.kind, r.variant, r.outcome, r.detail)
                                                             for r in result.unexpected]
    assert {r.kind for r in result.records} == set(soak.KINDS)
    assert result.in_flight_after == 0 and result.held_after == 0
    # sampled while requests still wrote; a write that bypassed the read replaces an entry with
    # one whose timings print a digit more or less, so the end may be a few bytes below it
    assert result.l1 and 0 < result.l1[-1][1] <= rag.cache.l1.bytes * 1.01
    before, end, entries = result.l1_growth()
    assert end >= before > 0 and entries > 0
    assert result.net_rss_growth() == result.rss_growth()[0] - (end - before)
    text = soak.report(result)
    assert "Net of the L1 answer cache" in text and "RSS growth pace" in text
    assert soak.failures(result, max_rss_growth_mb=10_000) == []
