"""``ragserve serve --ray`` on a real local Ray cluster (the session's ``ray_cluster``): two
ingress replicas over the real index, embedding model and a real Redis, and the generator
deployment wrapping the ``openai`` backend, pointed at the fake OpenAI-compatible server
(``fake_openai.py``, in this process). The same application over a real vLLM engine:
test_ray_serve_engine.py; the logic without a cluster: test_ray_serve_units.py.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ragserve.cache.redis_server import free_port
from ragserve.config import RAGConfig
from ragserve.testing.fake_openai import Behaviour, FakeOpenAI
from ragserve.testing.http import running
from ragserve.testing.redis import redis_server
from ragserve.testing.waits import CLUSTER_WAIT_S, HTTP_TIMEOUT_S, WAIT_S, eventually

from .test_http import sse_events
from .test_tracing import CALLER, TRACE, TRACEPARENT, otlp_receiver

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.http]

APP = "ragserve-test"
REPLY = "an answer from the fake server"
# [models]: "main" is [generate] (the first fake server), "other" a second server of its own
# (a generator deployment of its own), which answers OTHER_REPLY.
OTHER_REPLY = "another answer from the second server"
# The application has a keys file: every test's requests carry KEY; METERED is a tenant with
# a bucket of 3 requests that refills once in 100 s (the two-replica quota test).
KEY = "ray-key-0123456789abcdef"
METERED = "ray-metered-0123456789ab"
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextlib.contextmanager
def deployed(index: Any, config: RAGConfig, app: str = APP) -> Iterator[str]:
    """Serve ``index`` as the application ``app`` on the running Ray cluster, as ``ragserve
    serve --ray`` does (its proxy middleware included); yields the base URL once the proxy
    routes to it. Serve is shut down at the end, so every module starts its own."""
    from ray import serve

    from ragserve.ray.serve import proxy
    from ragserve.ray.serve.app import application
    from ragserve.ray.serve.run import _proxy_address

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                controller_options={"runtime_env": {"env_vars": {proxy.ENV: proxy.CALLBACK}}})
    host, port = _proxy_address("127.0.0.1", port)
    try:
        serve.run(application(index, config), name=app, route_prefix="/")
        url = f"http://{host}:{port}"
        # serve.run returns once the replicas run; the proxy learns the route in its own time
        eventually(lambda: httpx.get(f"{url}/health", timeout=HTTP_TIMEOUT_S).status_code == 200,
                   CLUSTER_WAIT_S, 0.2, "Serve's proxy to route /health to the application",
                   ignore=(httpx.HTTPError,))
        yield url
    finally:
        serve.delete(app)
        serve.shutdown()


@dataclass
class Served:
    url: str
    fake: FakeOpenAI
    other: FakeOpenAI
    config: RAGConfig
    index: Path
    corpus: Path
    otlp: list[tuple[str, dict[str, str], bytes]]


@pytest.fixture(scope="module")
def served(ray_cluster, xquad_corpus, embedder, tmp_path_factory) -> Iterator[Served]:
    from ragserve.build.builder import build_index

    corpus = tmp_path_factory.mktemp("ray-corpus")
    for f in xquad_corpus[0].iterdir():
        (corpus / f.name).write_bytes(f.read_bytes())
    index = tmp_path_factory.mktemp("ray-indexes") / "xquad"  # this module's own: one test rebuilds it
    build_index(corpus, index, RAGConfig(), embedder=embedder)
    keys = tmp_path_factory.mktemp("ray-keys") / "keys.json"
    keys.write_text(json.dumps({KEY: "ray", METERED: {"namespace": "metered", "name": "metered",
                                                      "requests_per_s": 0.01, "burst": 3}}))
    fake = FakeOpenAI(Behaviour(token_delay_s=0.01, slow_delay_s=0.3))
    other = FakeOpenAI(Behaviour(name="other-fake-model", reply=OTHER_REPLY))
    with redis_server() as redis, running(fake.app) as fake_url, running(other.app) as other_url, \
            otlp_receiver() as (otlp_url, otlp):
        cfg = RAGConfig().replace(
            # Traced, to a receiver in this process: the trace must cross the handle call.
            telemetry={"traces": "otlp", "endpoint": otlp_url + "/v1/traces"},
            generate={"backend": "openai", "max_tokens": 16}, prompt={"max_score_gap": 0},
            openai={"urls": [fake_url], "tokenizer": "server"}, cache={"redis_url": redis.url},
            server={"api_keys_file": str(keys)},
            models={"default": "main", "main": {},
                    "other": {"max_tokens": 8, "openai": {"urls": [other_url]}}},
            # 2 replicas x 2 requests each, and 2 more waiting in the proxy: small, for the burst test
            ray={"replicas": 2, "num_cpus": 0.5, "generator_num_cpus": 0.5, "max_ongoing_requests": 2,
                 "max_queued_requests": 2, "probe_interval_s": 0.5, "follow_index_s": 0.5})
        with deployed(index, cfg) as url:
            yield Served(url, fake, other, cfg, index, corpus, otlp)


def query(url: str, question: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/query", json={"question": question, **body}, headers=AUTH, timeout=120)


def replica(r: httpx.Response) -> str:
    return r.headers["x-ragserve-replica"]


def generator_status(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/stats", headers=AUTH, timeout=HTTP_TIMEOUT_S).json()["generator"]


def generator_status_once(url: str, seen: Callable[[dict[str, Any]], bool],
                          timeout_s: float = CLUSTER_WAIT_S) -> dict[str, Any]:
    """The generator's status once the answering replica's probe (every 0.5 s; each ingress
    replica has its own, and a busy machine delays them) has ``seen`` what the test did, or
    the last one after ``timeout_s``: the caller's asserts then say what was off."""
    deadline = time.monotonic() + timeout_s
    while not seen(status := generator_status(url)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return status


def ingress_replicas() -> dict[str, str]:
    """Serve replica id → its actor's name, for the ingress deployment's live replicas."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {n.rsplit("#", 1)[-1]: n for n in names if f"{APP}#RagserveIngress#" in n}


def test_answers_over_http_and_a_question_answered_by_one_replica_is_an_l2_hit_on_the_other(served):
    url, q = served.url, "Which team won Super Bowl 50?"
    first = query(url, q, top_k=2)
    body = first.json()
    assert first.status_code == 200 and first.headers["x-cache"] == "miss" and body["answer"] == REPLY
    assert body["model"] == "main" and len(body["sources"]) == 2
    assert body["usage"]["completion_tokens"] == 6
    assert body["timings"]["generate_first_token"] > 0 and body["timings"]["embed"] > 0
    seen = {replica(first): "miss"}
    for _ in range(40):  # Serve's router picks either replica: ask until the other one answers
        r = query(url, q, top_k=2)
        seen.setdefault(replica(r), r.headers["x-cache"])
        if len(seen) == 2:
            break
    assert sorted(seen.values()) == ["l2", "miss"], seen  # the other replica: from the shared Redis
    assert r.json()["answer"] == REPLY and r.json()["cache_tier"] in ("l1", "l2")
    echoed = query(url, "Who was the MVP?", stream=False, top_k=1)
    assert echoed.headers.get_list("x-request-id") == [echoed.json()["request_id"]]  # once, not twice
    ask = {"question": "Where was Super Bowl 50 played?", "stream": True}
    streamed = httpx.post(f"{url}/v1/query", json=ask, headers={**AUTH, "X-Request-Id": "stream-1"},
                          timeout=60)
    events = sse_events(streamed.text)
    assert streamed.headers.get_list("x-request-id") == ["stream-1"]
    assert [e for e, _ in events][0] == "sources" and events[-1][0] == "done"
    assert "".join(d["text"] for e, d in events if e == "token") == REPLY
    assert events[-1][1]["request_id"] == "stream-1"
    health = httpx.get(f"{url}/health", timeout=HTTP_TIMEOUT_S).json()
    assert health == {"status": "ok", "engine": "alive", "l2": "ok"}
    gen = generator_status_once(url, lambda g: g["backend_stats"]["endpoints"][0]["requests"] >= 1
                                and g["status_age_s"] < 5)
    assert gen["backend"] == "ray:openai" and gen["alive"] and gen["model"] == "fake-model"
    assert gen["backend_stats"]["endpoints"][0]["requests"] >= 1 and gen["status_age_s"] < 5


def test_each_model_answers_from_its_own_generator_deployment_and_an_unknown_one_is_refused(served):
    from ray import serve

    url, q = served.url, "Who won Super Bowl 50, by the second model?"
    deployments = serve.status().applications[APP].deployments
    assert {"RagserveGenerator", "RagserveGenerator-other"} <= set(deployments)
    listed = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=HTTP_TIMEOUT_S).json()["data"]
    assert [(m["id"], m["max_tokens"]) for m in listed] == [("main", 16), ("other", 8)]
    sent = len(served.other.bodies)
    other = query(url, q, model="other")
    assert other.status_code == 200, other.text
    assert (other.json()["model"], other.json()["answer"], other.headers["x-cache"]) == ("other", OTHER_REPLY, "miss")
    assert len(served.other.bodies) == sent + 1 and served.other.bodies[-1]["max_tokens"] == 8
    main = query(url, q)  # the same question, the default model: an entry of its own, from its own server
    assert (main.json()["model"], main.json()["answer"], main.headers["x-cache"]) == ("main", REPLY, "miss")
    again = query(url, q, model="other")
    assert again.json()["answer"] == OTHER_REPLY and again.headers["x-cache"] in ("l1", "l2")
    assert len(served.other.bodies) == sent + 1
    chat = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": "other", "messages": [{"role": "user", "content": "Where was Super Bowl 50 played?"}]})
    assert chat.status_code == 200 and chat.json()["model"] == "other", chat.text
    assert chat.json()["choices"][0]["message"]["content"] == OTHER_REPLY
    unknown = query(url, q, model="medium")
    assert unknown.status_code == 400 and unknown.json()["error"]["type"] == "UnknownModelError"
    chat = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=HTTP_TIMEOUT_S, json={
        "model": "medium", "messages": [{"role": "user", "content": q}]})
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found", chat.text


def exported_spans(otlp) -> list[Any]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    return [s for _, _, body in list(otlp) for rs in ExportTraceServiceRequest.FromString(body).resource_spans
            for ss in rs.scope_spans for s in ss.spans]


def test_a_callers_trace_crosses_the_ingress_and_the_generator_handle_call_to_the_remote_server(served):
    r = httpx.post(f"{served.url}/v1/query", json={"question": "What is traced across Ray replicas?"},
                   headers={**AUTH, "traceparent": TRACEPARENT}, timeout=120)
    assert r.status_code == 200 and r.json()["cache_tier"] == "miss"
    sent = next(h["traceparent"] for h in reversed(served.fake.headers)
                if h.get("x-request-id") == r.headers["x-request-id"])
    assert sent.split("-")[1] == TRACE  # the remote server is in the caller's trace

    def spans():
        found = {s.name: s for s in exported_spans(served.otlp) if s.trace_id.hex() == TRACE}
        chat = any(n.startswith("chat ") for n in found)
        return found if chat and {"POST /v1/query", "ragserve.generator"} <= set(found) else None

    found = eventually(spans, CLUSTER_WAIT_S, 0.2, "the replicas' spans to reach the OTLP receiver")
    ingress, generator = found["POST /v1/query"], found["ragserve.generator"]
    assert ingress.parent_span_id.hex() == CALLER
    assert generator.parent_span_id == ingress.span_id  # the handle call: ingress -> generator replica
    assert sent.split("-")[2] == generator.span_id.hex()  # and on to the remote server


def test_every_replicas_requests_reach_rays_metrics_export_with_its_replica_tag(served):
    """``/metrics`` behind the proxy is one replica's; Ray's metrics agent exports every
    replica's series (``ray_ragserve_*``, tagged by replica) on the node's export port."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    answered: dict[str, int] = {}
    for i in range(40):  # L1 hits and misses alike are answered requests
        r = query(served.url, f"Who won Super Bowl 50? ({i % 4})", top_k=1)
        assert r.status_code == 200
        answered[replica(r)] = answered.get(replica(r), 0) + 1
        if len(answered) == 2 and i >= 9:
            break
    assert len(answered) == 2, answered
    port = ray._private.worker.global_worker.node.metrics_export_port
    counted: dict[str, float] = {}
    text = ""
    # the agent exports what the replicas recorded every few seconds
    deadline = time.monotonic() + CLUSTER_WAIT_S
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=WAIT_S).text
        except httpx.HTTPError:  # the agent busy or still starting: not yet
            time.sleep(1)
            continue
        counted = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("ray_ragserve_requests") and sample.labels.get("outcome") == "ok":
                    rid = next((k for k in answered if k in sample.labels.get("replica", "")), None)
                    if rid is not None:
                        counted[rid] = counted.get(rid, 0) + sample.value
        if all(counted.get(rid, 0) >= n for rid, n in answered.items()):
            break
        time.sleep(1)
    assert all(counted.get(rid, 0) >= n for rid, n in answered.items()), (answered, counted)
    assert "ray_ragserve_stage_duration_seconds" in text and 'stage="total"' in text
    assert 'cache_tier="l1"' in text or 'cache_tier="l2"' in text


def test_a_client_that_leaves_a_stream_aborts_the_generation_on_the_generator_replica(served):
    url, fake = served.url, served.fake
    disconnects = fake.disconnects
    aborted = generator_status(url)["deployment"]["replica"]["aborted"]
    body = {"question": "a slow question about the stadium", "stream": True}
    with httpx.stream("POST", f"{url}/v1/query", json=body, headers=AUTH, timeout=60) as r, \
            contextlib.closing(r.iter_lines()) as lines:
        for line in lines:
            if line.startswith("event: token"):
                break  # one token came; now the client goes away mid-answer
    # The leaving client's cancellation crosses the proxy, the ingress and the generator replica.
    eventually(lambda: fake.disconnects != disconnects, CLUSTER_WAIT_S, 0.1,
               "the fake server to see the disconnect")
    assert fake.disconnects == disconnects + 1  # the openai backend closed its stream: the server aborts
    status = generator_status_once(url, lambda g: g["deployment"]["replica"]["aborted"] != aborted
                                   and g["deployment"]["unfinished"] == 0)
    assert status["deployment"]["replica"]["aborted"] == aborted + 1
    assert status["deployment"]["unfinished"] == 0 and fake.in_flight == 0


def test_a_burst_past_rays_queue_bounds_gets_429_with_retry_after_as_the_single_process_server(served):
    url = served.url

    def ask(i: int) -> httpx.Response:
        return query(url, f"a slow question number {i} about the halftime show?", cache={"read": False})

    # The admitted requests are held at the fake server until 6 refusals are in: the burst does
    # not depend on all 16 arriving before the first answers end.
    with ThreadPoolExecutor(16) as pool:
        with served.fake.held():
            futures = [pool.submit(ask, i) for i in range(16)]
            eventually(lambda: sum(f.done() for f in futures) >= 6, CLUSTER_WAIT_S, 0.05,
                       "6 of the burst to be answered while the admitted ones are held")
        responses = [f.result() for f in futures]
    statuses = sorted(r.status_code for r in responses)
    refused = [r for r in responses if r.status_code == 429]
    # 2 replicas x max_ongoing_requests 2 run, max_queued_requests 2 wait in the proxy: the rest
    # are refused. Serve's proxy counts a request it is still routing as queued, so when the 16
    # arrive faster than it assigns them (a loaded machine: 3 answered, once), fewer than the 4
    # replica slots may fill: at least the 2 queued ones are answered.
    assert statuses.count(200) >= 2 and len(refused) >= 6 and set(statuses) == {200, 429}, statuses
    for r in refused:
        error = r.json()["error"]
        assert r.headers["retry-after"] == "1" and r.headers["content-type"] == "application/json"
        assert error["type"] == "OverloadedError" and error["stage"] == "admission"
        assert "max_queued_requests=2" in error["message"] and r.headers["x-request-id"]
    assert all(r.json()["answer"] == REPLY for r in responses if r.status_code == 200)


def test_two_replicas_draw_on_one_quota_bucket_in_redis(served):
    """The metered tenant's bucket holds 3 requests: 3 answers in all, whichever replica
    takes each request, and a 429 QuotaExceeded with Retry-After from both replicas after."""
    url, metered = served.url, {"Authorization": f"Bearer {METERED}"}
    answered: list[str] = []
    refused: dict[str, httpx.Response] = {}
    for i in range(60):  # Serve's router picks a replica: ask until both have refused
        r = httpx.post(f"{url}/v1/query", json={"question": f"Who won Super Bowl 50? ({i % 2})", "top_k": 1},
                       headers=metered, timeout=120)
        assert r.status_code in (200, 429), r.text
        if r.status_code == 200:
            answered.append(replica(r))
        else:
            refused.setdefault(replica(r), r)
        if len(refused) == 2:
            break
    assert len(answered) == 3, answered  # one bucket: two per-replica buckets would answer up to 6
    assert len(refused) == 2, refused
    for r in refused.values():
        error = r.json()["error"]
        assert error["type"] == "QuotaExceeded" and 1 <= int(r.headers["retry-after"]) <= 100, error
    assert query(url, "Who won Super Bowl 50? (0)", top_k=1).status_code == 200  # other tenants go on


def test_every_replica_follows_a_rebuilt_index_to_its_new_version(served, embedder):
    from ragserve.build.builder import build_index

    url, q = served.url, "Which team won Super Bowl 50?"
    old = query(url, q).json()["index_fingerprint"]
    (served.corpus / "Extra_0.txt").write_text("A paragraph the Ray Serve test adds in a rebuild.", "utf-8")
    # the build flips the index path to a new version; no replica is told
    new = build_index(served.corpus, served.index, RAGConfig(), embedder=embedder).fingerprint
    assert new != old
    serving: dict[str, str] = {}
    deadline = time.monotonic() + CLUSTER_WAIT_S  # each replica looks every 0.5 s, then loads the new version
    while time.monotonic() < deadline and not (len(serving) == 2 and set(serving.values()) == {new}):
        r = query(url, q)
        serving[replica(r)] = r.json()["index_fingerprint"]
        time.sleep(0.05)
    assert len(serving) == 2 and set(serving.values()) == {new}, serving  # both, without an admin call


def test_a_killed_replica_is_replaced_and_after_that_no_request_fails(served):
    import ray
    from ray import serve

    url, fake = served.url, served.fake
    before = ingress_replicas()
    assert len(before) == 2
    # 4 requests fill both replicas (max_ongoing_requests 2 each): 2 of them are on the victim.
    # Held at the fake server until the victim's 2 have failed, so none ends before the kill.
    # Sent one at a time: Serve's proxy counts a request still being routed against
    # max_queued_requests, so 4 sent at the same instant could be refused (the burst test).
    with ThreadPoolExecutor(4) as pool:
        with fake.held():
            inflight = []
            for i in range(4):
                inflight.append(pool.submit(query, url, f"a slow question {i} on the killed replica?"))
                eventually(lambda: fake.in_flight == len(inflight), CLUSTER_WAIT_S, 0.02,
                           f"request {i} to reach the fake server")
            victim = sorted(before)[0]
            ray.kill(ray.get_actor(before[victim], namespace="serve"), no_restart=True)
            killed = time.monotonic()
            eventually(lambda: sum(f.done() for f in inflight) >= 2, CLUSTER_WAIT_S, 0.05,
                       "the killed replica's 2 requests to be answered")
        results = [f.result() for f in inflight]
    failed = [r for r in results if r.status_code != 200]
    # What the requests running on the killed replica get: a JSON 503 with Retry-After (the
    # proxy's own answer would be an empty 500; proxy.py gives it ragserve's shape).
    assert len(failed) == 2, [(r.status_code, r.text[:200]) for r in results]
    for r in failed:
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "ReplicaUnavailable"
    # Requests sent while the replica is replaced: all answered (by the survivor, then both).
    during: list[tuple[int, str, str]] = []
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            r = query(url, "Which team won Super Bowl 50?", top_k=2)
            during.append((r.status_code, r.headers.get("x-ragserve-replica", ""),
                           r.headers.get("x-cache", "")))
            time.sleep(0.05)

    asker = threading.Thread(target=keep_asking, daemon=True)
    asker.start()
    try:  # until the replacement has answered a request (Serve replaces it in its own time)
        eventually(lambda: any(rid not in before for _, rid, _ in during), 3 * CLUSTER_WAIT_S, 0.2,
                   "a replacement replica to answer")
    finally:
        stop.set()
        asker.join()
    statuses = [status for status, _, _ in during]
    print(f"replacement answering {time.monotonic() - killed:.1f} s after the kill; {len(during)} requests "
          f"meanwhile: { {c: statuses.count(c) for c in set(statuses)} }")

    def replaced() -> dict[str, str]:
        now = ingress_replicas()  # the GCS forgets the killed actor's name in its own time
        assert victim not in now and len(now) == 2, now
        return now

    now = eventually(replaced, CLUSTER_WAIT_S, 0.2, ignore=(AssertionError,))
    assert statuses == [200] * len(during), during
    new = (set(now) - set(before)).pop()
    answers = [(rid, tier) for _, rid, tier in during]
    for _ in range(30):
        r = query(url, "Which team won Super Bowl 50?", top_k=2)
        assert r.status_code == 200, r.text
        answers.append((replica(r), r.headers["x-cache"]))
    assert {rid for rid, _ in answers[-30:]} == set(now)  # both replicas serve again
    assert [tier for rid, tier in answers if rid == new][0] == "l2"  # its L1 was empty; the shared L2 is not
    eventually(lambda: serve.status().applications[APP].deployments["RagserveIngress"].status == "HEALTHY",
               CLUSTER_WAIT_S, 0.2, "Serve's controller to report the ingress deployment HEALTHY")
