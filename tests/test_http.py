"""The HTTP layer against a real uvicorn server on loopback, with fake models behind it
(the same behaviour against the real engine: test_http_engine.py)."""

import asyncio
import json
import threading

import httpx
import openai
import pytest

from ragserve.config import RAGConfig
from ragserve.server.app import create_app
from ragserve.server.auth import ApiKeys
from ragserve.testing.fakes import FakeGenerator
from ragserve.testing.fakes import fake_rag as make_rag
from ragserve.testing.http import get, post, running
from ragserve.testing.waits import HTTP_TIMEOUT_S, WAIT_S, aeventually, eventually

pytestmark = pytest.mark.http

KEY_A, KEY_B = "tenant-a-key-0123456789", "tenant-b-key-0123456789"


@pytest.fixture
def served(tmp_path):
    """(base_url, rag) for a server over fakes; options through request.param."""
    rag = make_rag(tmp_path, FakeGenerator(words=4, delay=0.05))
    with rag, running(create_app(rag, RAGConfig())) as url:
        yield url, rag


def sse_events(text):
    """[(event, data)] of an SSE body."""
    out = []
    for block in text.strip().split("\n\n"):
        event, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        out.append((event, data if data == "[DONE]" else json.loads(data)))
    return out


def test_query_returns_the_whole_result_with_request_id_and_cache_header(served):
    url, _ = served
    r = post(f"{url}/v1/query", json={"question": "which chunk?"}, headers={"X-Request-Id": "client-id-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-id-1" and r.headers["x-cache"] == "miss"
    body = r.json()
    assert body["answer"] == "an answer more more" and body["request_id"] == "client-id-1"
    assert {"doc_id", "chunk_id", "score", "text", "metadata"} <= set(body["sources"][0])
    assert body["timings"]["generate"] > 0 and body["usage"]["total_tokens"] > 0
    assert body["cache_tier"] == "miss" and body["model"] == "fake-llm" and body["index_fingerprint"]
    again = post(f"{url}/v1/query", json={"question": "which chunk?"})
    assert again.headers["x-cache"] == "l1" and len(again.headers["x-request-id"]) == 32


def test_stream_sends_sources_then_tokens_then_done_and_a_hit_streams_too(served):
    url, _ = served
    for tier in ("miss", "l1"):
        r = post(f"{url}/v1/query", json={"question": "stream me", "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        names = [e for e, _ in events]
        assert names[0] == "sources" and names[-1] == "done" and set(names[1:-1]) == {"token"}
        assert events[0][1]["cache_tier"] == tier and r.headers["x-cache"] == tier
        assert "".join(d["text"] for e, d in events if e == "token") == events[-1][1]["answer"]
        # a miss: one token event per piece, 4 pieces, but pieces that arrive together leave in
        # one event (sse.coalesce; a loaded machine does that); a hit is one piece
        assert (3 <= len(names) <= 6) if tier == "miss" else (len(names) == 3)


def test_retrieve_and_stats(served):
    url, _ = served
    r = post(f"{url}/v1/retrieve", json={"question": "anything", "top_k": 2})
    assert r.status_code == 200 and len(r.json()["sources"]) == 2
    post(f"{url}/v1/query", json={"question": "counted"})
    stats = get(f"{url}/v1/stats").json()
    assert stats["queries"] == 1 and stats["stages"]["generate"]["count"] == 1


@pytest.mark.parametrize("body, status, kind", [
    ({"question": ""}, 400, "EmptyQuestionError"),
    ({"question": "x" * 2001}, 400, "QuestionTooLongError"),
    ({"question": 42}, 422, "InvalidRequest"),
    ({"questio": "typo"}, 422, "InvalidRequest"),
    ({"question": "q", "top_k": 0}, 422, "InvalidRequest"),
    ({"question": "q", "timeout_s": -1}, 422, "InvalidRequest"),
])
def test_bad_bodies_get_typed_errors_and_never_a_trace(served, body, status, kind):
    url, _ = served
    r = post(f"{url}/v1/query", json=body)
    assert r.status_code == status and r.json()["error"]["type"] == kind
    assert set(r.json()["error"]) == {"type", "message", "stage"} and "Traceback" not in r.text


def test_malformed_and_oversized_bodies(served):
    url, _ = served
    r = post(f"{url}/v1/query", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "InvalidRequest"
    r = post(f"{url}/v1/query", json={"question": "q" * 70_000})
    assert r.status_code == 413 and r.json()["error"]["type"] == "PayloadTooLarge"

    def chunked():
        for _ in range(100):
            yield b"x" * 1024

    r = post(f"{url}/v1/query", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_overload_is_429_with_retry_after_at_once(tmp_path):
    rag = make_rag(tmp_path, FakeGenerator(delay=1.0), query={"max_in_flight": 1, "max_queued": 0})
    with rag, running(create_app(rag, RAGConfig())) as url:
        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
                return await asyncio.gather(*(client.post("/v1/query", json={"question": f"q{i}"}) for i in range(6)))

        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert statuses[0] == 200 and statuses.count(429) >= 4
        refused = [r for r in responses if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "OverloadedError" for r in refused)
        # At once: each refusal came back faster than any answer (the generator's 1 s), not
        # after it; a load that slows the one slows the other.
        answered = [r.elapsed.total_seconds() for r in responses if r.status_code == 200]
        assert max(r.elapsed.total_seconds() for r in refused) < min(answered)


def test_deadline_is_504(tmp_path):
    rag = make_rag(tmp_path, FakeGenerator(delay=60.0))  # a minute: only an abort ends it sooner
    with rag, running(create_app(rag, RAGConfig())) as url:
        r = post(f"{url}/v1/query", json={"question": "slow", "timeout_s": 0.2})
        assert r.status_code == 504 and r.json()["error"]["type"] == "DeadlineExceededError"
        eventually(lambda: rag.generator.running == 0, WAIT_S, what="the generation to be aborted")
        assert len(rag.cache.l1) == 0


def test_keys_decide_the_tenant_and_the_body_namespace_is_ignored(tmp_path):
    rag = make_rag(tmp_path, FakeGenerator())
    keys = ApiKeys({KEY_A: "tenant-a", KEY_B: "tenant-b"})
    with rag, running(create_app(rag, RAGConfig(), keys=keys)) as url:
        q = {"question": "tenant secret?"}
        assert post(f"{url}/v1/query", json=q).status_code == 401
        bad = post(f"{url}/v1/query", json=q, headers={"Authorization": "Bearer wrong-key-0123456789"})
        assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
        a = {"Authorization": f"Bearer {KEY_A}"}
        b = {"Authorization": f"Bearer {KEY_B}"}
        assert post(f"{url}/v1/query", json=q, headers=a).headers["x-cache"] == "miss"
        assert post(f"{url}/v1/query", json=q, headers=a).headers["x-cache"] == "l1"
        # B asks for A's namespace in the body: the key decides, so it is a miss in B's own
        r = post(f"{url}/v1/query", json={**q, "namespace": "tenant-a"}, headers=b)
        assert r.status_code == 200 and r.headers["x-cache"] == "miss"
        assert get(f"{url}/v1/stats").status_code == 401
        assert get(f"{url}/health").status_code == 200  # probes need no key


def test_openai_sdk_against_the_chat_endpoint(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["fake-llm"]
    r = client.chat.completions.create(model="ragserve", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "which chunk?"}])
    assert r.choices[0].message.content == "an answer more more" and r.choices[0].finish_reason == "stop"
    assert r.model_extra["sources"][0]["doc_id"] and r.usage.total_tokens > 0
    chunks = list(client.chat.completions.create(model="fake-llm", stream=True,
                                                 messages=[{"role": "user", "content": "stream it"}],
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices == [] and chunks[0].model_extra["sources"]  # sources first
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "an answer more more" and chunks[-1].usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="ragserve", temperature=0.7, messages=[{"role": "user", "content": "q"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "q"}])


def test_openai_stream_ends_with_done(served):
    url, _ = served
    r = post(f"{url}/v1/chat/completions", json={"model": "ragserve", "stream": True,
                                                       "messages": [{"role": "user", "content": "raw frames"}]})
    events = sse_events(r.text)
    assert events[-1] == (None, "[DONE]") and events[0][1]["sources"] and events[0][1]["choices"] == []
    assert all(d["object"] == "chat.completion.chunk" for _, d in events[:-1])


def test_health_ready_metrics(served):
    url, rag = served
    assert get(f"{url}/health").json()["status"] == "ok"
    assert get(f"{url}/ready").status_code == 200
    post(f"{url}/v1/query", json={"question": "metrics"})
    post(f"{url}/v1/query", json={"question": "metrics"})
    post(f"{url}/v1/query", json={"question": ""})
    m = get(f"{url}/metrics").text
    assert 'ragserve_stage_duration_seconds_count{stage="generate"} 1.0' in m
    assert 'ragserve_answers_total{cache_tier="l1"} 1.0' in m
    assert 'ragserve_requests_total{outcome="invalid"} 1.0' in m
    assert 'ragserve_errors_total{type="EmptyQuestionError"} 1.0' in m
    assert "ragserve_in_flight 0.0" in m and "ragserve_generated_tokens_total 4.0" in m


def test_the_page_is_served(served):
    url, _ = served
    r = get(url)
    assert r.status_code == 200 and "<title>ragserve</title>" in r.text


def test_a_dead_engine_is_503_on_probes_and_requests(tmp_path):
    from ragserve.errors import EngineDeadError

    class Dead(FakeGenerator):
        def alive(self):
            return False

        async def stream(self, prompt, request_id, token_ids=None, deltas=True):
            raise EngineDeadError("the vLLM engine died: test")
            yield  # an async generator that fails on its first step

    rag = make_rag(tmp_path, Dead())
    with rag, running(create_app(rag, RAGConfig())) as url:
        assert get(f"{url}/health").status_code == 503 and get(f"{url}/ready").status_code == 503
        assert get(f"{url}/health").json()["engine"] == "dead"
        r = post(f"{url}/v1/query", json={"question": "anyone there?"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "EngineDeadError"
        s = post(f"{url}/v1/query", json={"question": "anyone there?", "stream": True})
        assert s.status_code == 503  # known before the first event: a status, not a broken stream
        Dead.alive = lambda self: True  # dies only once the stream has begun: its last event says so
        s = post(f"{url}/v1/query", json={"question": "anyone there?", "stream": True})
        events = sse_events(s.text)
        assert s.status_code == 200 and [e for e, _ in events] == ["sources", "error"]
        assert events[-1][1]["error"]["type"] == "EngineDeadError"


def test_every_request_is_one_access_log_line_with_its_request_id(served, caplog):
    import logging

    url, _ = served
    with caplog.at_level(logging.INFO, logger="ragserve.access"):
        post(f"{url}/v1/query", json={"question": "logged?"}, headers={"X-Request-Id": "trace-me-42"})
        post(f"{url}/v1/query", json={"question": ""}, headers={"X-Request-Id": "trace-me-43"})
        # NOTE: the access line is written once the response has gone out: the client can
        # have it first, so the lines are awaited, not read at once.

        def logged():
            lines = [r.getMessage() for r in caplog.records if r.name == "ragserve.access"]
            return (any(m.startswith("trace-me-42 POST /v1/query 200 ") for m in lines)
                    and any(m.startswith("trace-me-43 POST /v1/query 400 ") for m in lines))

        eventually(logged, WAIT_S, 0.02, "both access lines")


def test_unknown_paths_wrong_methods_and_odd_content_parts_get_typed_errors(served):
    url, _ = served
    r = get(f"{url}/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFound"
    r = get(f"{url}/v1/query")
    assert r.status_code == 405 and r.json()["error"]["type"] == "MethodNotAllowed" and "allow" in r.headers
    r = post(f"{url}/v1/chat/completions", json={"model": "ragserve", "messages": [
        {"role": "user", "content": [{"type": "text", "text": 5}]}]})
    assert r.status_code == 422 and r.json()["error"]["type"] == "InvalidRequest"
    r = post(f"{url}/v1/chat/completions", json={"model": "ragserve", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "q?"}]}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    r = post(f"{url}/v1/query", json={"question": "q", "namespace": "a\u0000b"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidTextError"


def test_a_bug_is_a_typed_500_with_the_request_id_and_one_access_line(served, caplog, monkeypatch):
    import logging

    url, rag = served
    monkeypatch.setattr(rag, "stats", lambda: 1 / 0)
    with caplog.at_level(logging.INFO, logger="ragserve"):
        r = get(f"{url}/v1/stats", headers={"X-Request-Id": "bug-1"})
        eventually(lambda: any(m.getMessage().startswith("bug-1 GET /v1/stats 500") for m in caplog.records),
                   WAIT_S, 0.02, "the access line (written once the response has gone out)")
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    assert r.json()["error"] == {"type": "InternalError", "stage": "server",
                                 "message": "internal error (request bug-1); see the server log"}
    assert "ZeroDivisionError" not in r.text


def test_a_stream_joining_a_plain_querys_run_still_streams(tmp_path):
    gen = FakeGenerator(delay=0.4, words=4)
    rag = make_rag(tmp_path, gen)

    async def both():
        gen.hold = True  # the plain query's run stays in flight until the stream has chosen
        plain = asyncio.ensure_future(rag.aquery("shared question"))
        await aeventually(lambda: gen.running == 1, what="the plain query's run to start")

        async def streamed():
            return [e async for e in rag.astream("shared question")]

        stream = asyncio.ensure_future(streamed())
        await aeventually(lambda: gen.running == 2 or rag.stats()["single_flight"]["shared"],
                          what="the stream to start a run or join one")
        gen.hold = False
        return await plain, await stream

    with rag:
        plain, events = asyncio.run(both())
    tokens = [e for e in events if type(e).__name__ == "TokenEvent"]
    assert len(tokens) == 4 and plain.answer == events[-1].result.answer
    assert len(gen.prompts) == 2  # a stream does not join a final-output-only run: it starts its own


def test_tenants_are_isolated_on_the_openai_endpoint_too(tmp_path):
    rag = make_rag(tmp_path, FakeGenerator())
    keys = ApiKeys({KEY_A: "tenant-a", KEY_B: "tenant-b"})
    with rag, running(create_app(rag, RAGConfig(), keys=keys)) as url:
        body = {"model": "ragserve", "messages": [{"role": "user", "content": "chat secret?"}]}
        assert post(f"{url}/v1/chat/completions", json=body).status_code == 401
        a = {"Authorization": f"Bearer {KEY_A}"}
        b = {"Authorization": f"Bearer {KEY_B}"}
        assert post(f"{url}/v1/chat/completions", json=body, headers=a).headers["x-cache"] == "miss"
        assert post(f"{url}/v1/chat/completions", json=body, headers=a).headers["x-cache"] == "l1"
        assert post(f"{url}/v1/chat/completions", json={**body, "stream": True},
                          headers=b).headers["x-cache"] == "miss"


def test_requests_left_when_the_drain_grace_ends_get_a_typed_503_and_the_server_stops(tmp_path):
    """The drain of ``ragserve serve`` (``DrainingServer``), its grace shorter than the answers:
    uvicorn cancels what is left; the middleware answers what had not begun with 503."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from ragserve.server.run import DrainingServer

    gen = FakeGenerator(words=4, delay=120.0)  # far past the grace, and past any wait below
    rag = make_rag(tmp_path, gen)
    app = create_app(rag, RAGConfig())
    servers: list[DrainingServer] = []

    def draining(config):
        servers.append(DrainingServer(config, app.state.served.state, grace_s=0.5))
        return servers[0]

    def stream(url: str) -> str:
        try:
            return post(f"{url}/v1/query", json={"question": "a slow stream", "stream": True}).text
        except httpx.RemoteProtocolError:
            return "cut off"

    with rag, ThreadPoolExecutor(2) as pool:
        with running(app, server=draining) as url:  # the block ends only once the server has stopped
            plain = pool.submit(post, f"{url}/v1/query", json={"question": "a slow one"})
            streamed = pool.submit(stream, url)
            eventually(lambda: gen.running == 2, WAIT_S, 0.01, "both requests to be generating")
            servers[0].handle_exit(signal.SIGTERM, None)
            r = plain.result(timeout=HTTP_TIMEOUT_S)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "ShutDown" and r.headers["x-request-id"]
            # begun: cut off, never "done"
            assert "event: done" not in streamed.result(timeout=HTTP_TIMEOUT_S)
            assert servers[0].should_exit  # the drain ended it, not the end of this block
        # the generations were aborted with their requests
        eventually(lambda: gen.running == 0, WAIT_S, 0.05, "the generations to be aborted")
        stats = rag.stats()
        assert stats["cache"]["l1"]["writes"] == 0 and stats["cancelled"] == 2  # nothing cached


def test_retrieve_has_its_own_admission_bounds_and_the_query_deadline(tmp_path):
    """A flood of ``/v1/retrieve`` is refused with 429 past its bounds (apart from the
    generation slots), and a retrieval past ``query.timeout_s`` gets 504. The slow embedding
    calls are held on events until the test has seen what it needs, not given durations to
    outlast."""
    from concurrent.futures import ThreadPoolExecutor

    def held_embedder(rag, held_when):
        encode, go = rag.embedder.encode, threading.Event()

        def encode_when_let_go(texts, **kw):
            if held_when(texts):
                assert go.wait(WAIT_S), "a held embedding call was never let go"
            return encode(texts, **kw)

        rag.embedder.encode = encode_when_let_go
        return go

    rag = make_rag(tmp_path / "bounds", query={"max_in_flight": 1, "max_queued": 1})
    go = held_embedder(rag, lambda texts: True)
    with rag, running(create_app(rag, RAGConfig())) as url, ThreadPoolExecutor(2) as pool:
        def ask(i: int) -> httpx.Response:
            return post(f"{url}/v1/retrieve", json={"question": f"retrieve {i}"})

        try:
            held = [pool.submit(ask, i) for i in range(2)]  # one embedding (held), one waiting for its slot
            eventually(lambda: (rag.stats()["retrievals"]["in_flight"], rag.stats()["retrievals"]["queued"])
                       == (1, 1), WAIT_S, 0.01, "one retrieval in flight and one queued")
            refused = [ask(i) for i in range(2, 8)]  # past both bounds while they are held
        finally:
            go.set()
        codes = sorted([f.result().status_code for f in held] + [r.status_code for r in refused])
        assert codes[0] == 200 and codes[-1] == 429, codes
        assert [f.result().status_code for f in held] == [200, 200]
        assert all(r.status_code == 429 and r.headers["retry-after"] for r in refused)
        assert refused[0].json()["error"]["type"] == "OverloadedError"
        stats = get(f"{url}/v1/stats").json()
        assert stats["retrievals"]["rejected"] >= 2 and stats["retrievals"]["in_flight"] == 0
        assert stats["admission"]["admitted"] == 0  # no generation slot was taken
        metrics = get(f"{url}/metrics").text
        assert f"ragserve_retrieval_rejections_total {float(stats['retrievals']['rejected'])}" in metrics
        assert "ragserve_retrievals_in_flight 0.0" in metrics and "ragserve_retrievals_total " in metrics

    rag = make_rag(tmp_path / "deadline", query={"max_in_flight": 1, "max_queued": 1, "timeout_s": 2.0})
    go = held_embedder(rag, lambda texts: any("too slow" in t for t in texts))
    with rag, running(create_app(rag, RAGConfig())) as url:
        try:  # held past its 2 s deadline: only the deadline can answer it
            late = post(f"{url}/v1/retrieve", json={"question": "too slow"})
        finally:
            go.set()
        assert late.status_code == 504 and late.json()["error"]["type"] == "DeadlineExceededError"
        assert post(f"{url}/v1/retrieve", json={"question": "after"}).status_code == 200
