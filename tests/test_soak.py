"""The soak's short form (issue 16): the driver of ``benchmarks/soak.py`` for ~40 s against the
session's real engine, served by a real uvicorn on loopback. Hits, misses, streams (native
and chat), cancellations, deadlines, bad inputs and retrievals, all at once; no 500, every
response the one its request must get, no fd leak, nothing left running in vLLM.

RSS is printed, not asserted: in CI it is noise (other tests share the process and the
machine). The long form, with its RSS growth, is ``python benchmarks/soak.py --minutes 10``.
"""

import asyncio
import os

import pytest

from ragserve.server.app import create_app
from ragserve.testing.http import running
from ragserve.testing.waits import WAIT_S, eventually

from .conftest import load_benchmark

pytestmark = [pytest.mark.engine, pytest.mark.http]


def load_soak():
    """``benchmarks/soak.py`` as a module: one copy of the driver for the script and this test."""
    return load_benchmark("soak")


@pytest.fixture(scope="module")
def url(rag):
    with running(create_app(rag, rag.config)) as base:
        yield base


def test_a_short_mixed_soak_has_no_500_no_unexpected_response_and_no_fd_leak(url, rag, xquad_corpus):
    soak = load_soak()
    # Native requests use the soak's own namespace; chat requests cannot, so they take
    # the questions no other engine test asks (test_batch's 100:106 are left alone).
    questions = [q["question"] for q in xquad_corpus[1][110:]]
    settings = soak.Settings(duration_s=24, concurrency=8, warmup_s=6, period_s=6, sample_s=2, hot=6,
                             request_timeout_s=300)  # a generation on a busy 2-core machine: up to a minute
    # One process: "server" RSS and fds are this test process's (client included); the
    # engine column is vLLM's engine core.
    result = asyncio.run(soak.run(url, questions, settings, pid=os.getpid()))
    print("\n" + soak.report(result))

    assert not result.errors_500, [(r.request_id, r.kind, r.variant, r.detail) for r in result.errors_500]
    assert not result.unexpected, [(r.request_id, r.kind, r.variant, r.outcome, r.detail)
                                   for r in result.unexpected]
    kinds = {r.kind for r in result.records}
    assert kinds == set(soak.KINDS), f"kinds never sent: {set(soak.KINDS) - kinds}"
    outcomes = {r.outcome for r in result.records}
    assert "abandoned after the first token" in outcomes and "504 DeadlineExceededError" in outcomes
    assert result.in_flight_after == 0 and result.held_after == 0
    eventually(lambda: rag.generator.unfinished() == 0, WAIT_S, 0.05,
               "abandoned or timed-out requests to leave vLLM")
    assert result.fd_growth() is not None and result.fd_growth() <= 16
