"""The soak's short form (issue 16): the driver of ``scripts/soak.py`` for ~40 s against the
session's real engine, served by a real uvicorn on loopback. Hits, misses, streams (native
and chat), cancellations, deadlines, bad inputs and retrievals, all at once; no 500, every
response the one its request must get, no fd leak, nothing left running in vLLM.

RSS is printed, not asserted: in CI it is noise (other tests share the process and the
machine). The long form, with its RSS growth, is ``python scripts/soak.py --minutes 10``.
"""

import asyncio
import importlib.util
import os
import sys

import pytest

from ragserve.server.app import create_app
from ragserve.testing.http import running
from ragserve.testing.waits import WAIT_S, eventually

from .conftest import ROOT

pytestmark = [pytest.mark.engine, pytest.mark.http]


def load_soak():
    """``scripts/soak.py`` as a module: one copy of the driver for the script and this test."""
    if "ragserve_soak" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ragserve_soak", ROOT / "scripts" / "soak.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # before exec: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["ragserve_soak"]


@pytest.fixture(scope="module")
def url(rag):
    with running(create_app(rag, rag.config)) as base:
        yield base


def test_a_short_mixed_soak_has_no_500_no_unexpected_response_and_no_fd_leak(url, rag, xquad_corpus):
    soak = load_soak()
    # Native requests use the soak's own namespace; chat requests cannot, so they take
    # the questions no other engine test asks (test_batch's 100:106 are left alone).
    questions = [q["question"] for q in xquad_corpus[1][110:]]
    settings = soak.Settings(duration_s=40, concurrency=8, warmup_s=10, period_s=10, sample_s=2, hot=6,
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
