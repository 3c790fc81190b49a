"""``ragserve serve`` as a process, as an operator runs it: SIGTERM drains and exits 0, and
answers in the embedded Redis survive a restart, and a SIGKILLed server leaves no vLLM engine
core behind (each start is a real vLLM engine)."""

import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

from ragserve.server.process import ServerProcess, group_members
from ragserve.testing.http import get, post
from ragserve.testing.waits import CLUSTER_WAIT_S, WAIT_S, eventually

pytestmark = [pytest.mark.engine, pytest.mark.http, pytest.mark.redis]


def start(index: Path, home: Path) -> ServerProcess:
    from ragserve.models.resolve import resolve_generation_model

    # The prepared models live in the user's RAGSERVE_HOME; this one only holds the server's data.
    # Every top-k source in the prompt (no score gap): longer prefills keep the drained
    # requests in flight long enough for the test to see the draining server answer 503.
    env = {"RAGSERVE_HOME": str(home), "RAGSERVE_GENERATE_MAX_TOKENS": "32", "RAGSERVE_VLLM_KV_CACHE_GIB": "1",
           "RAGSERVE_PROMPT_MAX_SCORE_GAP": "0",
           "RAGSERVE_GENERATE_MODEL": str(resolve_generation_model("default"))}
    return ServerProcess(index, env=env, args=["--grace", "60"], start_timeout_s=240).start()


def test_sigterm_drains_then_exits_0_l2_answers_survive_a_restart_and_sigkill_leaves_no_engine(
        xquad_index, xquad_corpus, tmp_path):
    home = tmp_path / "home"
    questions = [q["question"] for q in xquad_corpus[1][60:64]]
    srv = start(xquad_index, home)
    url = srv.url
    try:
        first = post(f"{url}/v1/query", json={"question": questions[0]}, timeout=120)
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        assert get(f"{url}/ready").status_code == 200

        results: dict[int, httpx.Response] = {}

        def ask(i: int) -> None:
            results[i] = post(f"{url}/v1/query", json={"question": questions[i], "cache": {"read": False}},
                              timeout=120)

        threads = [threading.Thread(target=ask, args=(i,)) for i in (1, 2, 3)]
        for t in threads:
            t.start()
        eventually(lambda: get(f"{url}/v1/stats").json()["gauges"]["in_flight"]["current"] >= 3, WAIT_S, 0.02,
                   "the 3 requests to be in flight")
        srv.signal(signal.SIGTERM)
        # the signal is handled on the server's loop
        eventually(lambda: get(f"{url}/ready").status_code == 503, WAIT_S, 0.01, "SIGTERM to start the drain")
        refused = post(f"{url}/v1/query", json={"question": "arriving late"})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "Draining"
        assert get(f"{url}/ready").status_code == 503 and get(f"{url}/health").status_code == 503
        for t in threads:
            t.join(timeout=120)
        assert [results[i].status_code for i in (1, 2, 3)] == [200, 200, 200]
        assert all(results[i].json()["answer"] for i in (1, 2, 3))
        assert srv.stop(timeout_s=60) == 0, srv.tail()
        # the engine core ends with its server, never left running
        eventually(lambda: not srv.group_alive(), CLUSTER_WAIT_S, 0.1,
                   "every process of the stopped server to end")
    finally:
        srv.kill()

    srv = start(xquad_index, home)  # a new process: empty L1, the same Redis data
    try:
        again = post(f"{srv.url}/v1/query", json={"question": questions[0]}, timeout=120)
        assert again.headers["x-cache"] == "l2" and again.json()["answer"] == first.json()["answer"]
        srv.signal(signal.SIGHUP)  # reload: the same version, so nothing changes, and nothing breaks

        def reloaded() -> bool:
            assert "SIGHUP reload" in (log := srv.tail(20_000)), log
            return True

        eventually(reloaded, CLUSTER_WAIT_S, 0.1, ignore=(AssertionError,))  # the log, if it never comes
        assert "'changed': False" in srv.tail(20_000)
        assert post(f"{srv.url}/v1/query", json={"question": questions[0]}).headers["x-cache"] == "l1"
        # SIGKILL to the server alone (the OOM killer, kill -9): no handler runs, and its vLLM
        # engine core, another process of its group, must still end with it (generators/lifeline.py)
        assert len(group_members(srv.pid)) >= 2, "the engine core is a process of the server's group"
        os.kill(srv.pid, signal.SIGKILL)
        eventually(lambda: not group_members(srv.pid), CLUSTER_WAIT_S, 0.1,
                   "the engine core of the SIGKILLed server to end")
    finally:
        srv.kill()
