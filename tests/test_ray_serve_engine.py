"""``ragserve serve --ray`` with the real vLLM engine in the generator deployment: two ingress
replicas, a real Redis, the default model under two ``[models]`` that differ only in
max_tokens, so they share the one engine and the one deployment (the same application over
a fake OpenAI server: test_ray_serve.py). Run it alone with the engine lock:
``flock /tmp/ragserve-engine.lock pytest -m "engine and ray" --timeout 900``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ragserve.config import RAGConfig
from ragserve.testing.redis import redis_server
from ragserve.testing.waits import CLUSTER_WAIT_S, HTTP_TIMEOUT_S, eventually

from .test_http import sse_events
from .test_ray_serve import deployed, generator_status, generator_status_once, query, replica

pytestmark = [pytest.mark.engine, pytest.mark.ray, pytest.mark.redis, pytest.mark.http]


@pytest.fixture(scope="module")
def served(ray_cluster, xquad_index) -> Iterator[str]:
    with redis_server() as redis:
        cfg = RAGConfig().replace(
            generate={"max_tokens": 96}, vllm={"kv_cache_gib": 1}, cache={"redis_url": redis.url},
            models={"default": "full", "full": {}, "brief": {"max_tokens": 8}},
            ray={"replicas": 2, "num_cpus": 0.5, "generator_num_cpus": 1, "probe_interval_s": 0.5})
        with deployed(xquad_index, cfg, app="ragserve-engine") as url:
            yield url


def test_vllm_in_the_generator_deployment_answers_with_its_own_stage_split_and_l2_is_shared(served):
    url, q = served, "Which NFL team represented the AFC at Super Bowl 50?"
    first = query(url, q)
    body = first.json()
    assert first.status_code == 200 and first.headers["x-cache"] == "miss", first.text
    assert body["answer"].strip() and body["model"] == "full"
    assert 0 < body["usage"]["completion_tokens"] <= 96 and body["usage"]["prompt_tokens"] > 100
    t = body["timings"]
    # vLLM's own per-request timestamps, carried back from the generator replica unchanged
    assert t["generate_first_token"] > 0 and t["generate_queue"] >= 0 and t["generate_decode"] >= 0
    assert t["generate"] >= t["generate_queue"] + t["generate_first_token"] + t["generate_decode"] - 1
    seen = {replica(first): "miss"}
    for _ in range(40):
        r = query(url, q)
        seen.setdefault(replica(r), r.headers["x-cache"])
        if len(seen) == 2:
            break
    assert sorted(seen.values()) == ["l2", "miss"] and r.json()["answer"] == body["answer"]
    # the status is the answering replica's last probe of the deployment (every 0.5 s here)
    gen = generator_status_once(url, lambda g: g["prefix_cache"]["requests"] >= 1)
    assert gen["backend"] == "ray:vllm" and gen["alive"] and gen["prefix_cache"]["requests"] >= 1
    assert httpx.get(f"{url}/health", timeout=HTTP_TIMEOUT_S).json()["engine"] == "alive"


def test_two_models_that_differ_only_in_sampling_share_one_deployment_and_its_engine(served):
    from ray import serve

    url, q = served, "Describe in detail everything the passages say about the Super Bowl 50 halftime show."
    deployments = serve.status().applications["ragserve-engine"].deployments
    assert [d for d in deployments if d.startswith("RagserveGenerator")] == ["RagserveGenerator"]
    brief, full = query(url, q, model="brief"), query(url, q)
    assert brief.status_code == full.status_code == 200, (brief.text, full.text)
    assert (brief.json()["model"], brief.headers["x-cache"]) == ("brief", "miss")
    assert (full.json()["model"], full.headers["x-cache"]) == ("full", "miss")  # its own cache entry
    assert brief.json()["usage"]["completion_tokens"] <= 8 < full.json()["usage"]["completion_tokens"]


def test_a_client_that_leaves_a_stream_aborts_the_vllm_request(served):
    url = served
    before = generator_status(url)["deployment"]["replica"]
    ask = {"question": "Describe in detail everything the passages say about the Denver Broncos defense.",
           "stream": True, "cache": {"read": False, "write": False}}
    events = []
    with httpx.stream("POST", f"{url}/v1/query", json=ask, timeout=120) as r, \
            contextlib.closing(r.iter_lines()) as lines:
        for line in lines:
            events.append(line)
            if line.startswith("event: token"):
                break  # the first piece came; the client goes away mid-answer
    # the abort crosses the proxy, the ingress and the generator replica; then that replica's probe
    status = generator_status_once(url, lambda g: g["deployment"]["replica"]["requests"] > before["requests"]
                                   and g["deployment"]["replica"]["aborted"] != before["aborted"]
                                   and g["deployment"]["unfinished"] == 0, CLUSTER_WAIT_S)
    after = status["deployment"]["replica"]
    assert status["deployment"]["unfinished"] == 0  # nothing left running in vLLM
    assert after["aborted"] == before["aborted"] + 1, (before, after)  # cancelled, not finished
    # and a streamed answer that is read to its end still works after the abort
    done = sse_events(httpx.post(f"{url}/v1/query", json={**ask, "question": "Who won Super Bowl 50?"},
                                 timeout=120).text)
    assert done[0][0] == "sources" and done[-1][0] == "done" and done[-1][1]["answer"].strip()


def _engine_cores(app: str = "ragserve-engine") -> dict[int, int]:
    """Live vLLM engine-core processes whose parent is a Serve replica of ``app`` (Ray titles
    its workers ``ray::ServeReplica:APP:DEPLOYMENT``) or that lost their parent (ppid 1) →
    their parent pid, from ``/proc``."""
    cores = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            cmdline = (p / "cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z" or not (b"EngineCore" in cmdline or "EngineCor" in name):
            continue
        ppid = int(fields[2])
        try:
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except OSError:
            parent = b""
        if ppid == 1 or app.encode() in parent:
            cores[int(p.name)] = ppid
    return cores


def test_a_sigkilled_generator_replica_takes_its_engine_core_with_it_and_is_replaced(served):
    """Last in the module: it costs the deployment a new engine. The replica's vLLM engine
    core watches its parent (generators/lifeline.py), so killing the replica with SIGKILL
    (no shutdown path runs) leaves no orphan holding the model's memory."""
    url = served
    cores = _engine_cores()
    assert len(cores) == 1, cores  # the one generator replica's engine
    (core, replica_pid), = cores.items()
    os.kill(replica_pid, signal.SIGKILL)
    eventually(lambda: core not in _engine_cores(), CLUSTER_WAIT_S, 0.2, "the engine core to end with its replica")
    # Serve starts a new replica with a new engine; then the service answers again, with one engine

    def answered() -> httpx.Response | None:
        r = query(url, "Who won Super Bowl 50?", cache={"read": False, "write": False})
        return r if r.status_code == 200 else None

    answered = eventually(answered, CLUSTER_WAIT_S * 4, 1.0, "a new generator replica to answer",
                          ignore=(httpx.HTTPError,))
    assert answered.json()["answer"].strip()
    after = _engine_cores()
    assert len(after) == 1 and core not in after and replica_pid not in after.values(), after
    assert all(ppid != 1 for ppid in after.values())
