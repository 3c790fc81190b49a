"""OpenTelemetry traces of requests (issue 25): a real loopback server over the fakes and
httpx; the spans caught by the SDK's in-memory exporter, or sent over real OTLP/HTTP to a
receiver on loopback; ``traceparent`` continued into ragserve, on to an OpenAI-compatible
server and over the Ray generator handle call; exemplars in OpenMetrics; nothing of
OpenTelemetry imported with tracing off."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ragserve.config import RAGConfig
from ragserve.observe.propagation import parse_traceparent
from ragserve.observe.traces import Tracing, make_tracing
from ragserve.server.app import create_app
from ragserve.testing.fakes import FakeGenerator, fake_rag
from ragserve.testing.http import get, post, running
from ragserve.testing.waits import WAIT_S, eventually

pytestmark = pytest.mark.http

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{CALLER}-01"
MISS_CHAIN = ["ragserve.cache.lookup", "ragserve.admission", "ragserve.embed_wait", "embeddings default",
              "retrieval", "ragserve.docload", "ragserve.prompt", "chat fake-llm"]
SPAN_OF = {"ragserve.cache.lookup": ("cache_l1", "cache_l2"), "ragserve.admission": ("admission",),
           "ragserve.embed_wait": ("embed_wait",), "embeddings default": ("embed",), "retrieval": ("search",),
           "ragserve.docload": ("docload",), "ragserve.prompt": ("prompt",), "chat fake-llm": ("generate",),
           "ragserve.query": ("total",), "ragserve.single_flight.join": ("total", "-cache_l1", "-cache_l2")}


@contextmanager
def served(tmp_path, generator=None, capture_content=False, **sections):
    exporter = InMemorySpanExporter()
    config = RAGConfig().replace(telemetry={"capture_content": capture_content}, **sections)
    tracing = make_tracing(config, exporter)
    rag = fake_rag(tmp_path / "idx", generator, config=config)
    try:
        with running(create_app(rag, config, tracing=tracing)) as url:
            yield url, exporter, tracing
    finally:
        tracing.shutdown()
        rag.close()


def spans_by_trace(exporter, tracing, servers=1):
    """The exported spans by trace id, once ``servers`` server spans of POSTs are among them
    (a test's polling GETs are traced too). The server span ends after the response's last
    byte is sent, so a client can hold its answer a moment before that span is queued: wait
    for it rather than flush once."""

    def exported():
        assert tracing.flush()
        spans = exporter.get_finished_spans()
        posts = sum(s.kind.name == "SERVER" and s.name.startswith("POST") for s in spans)
        return [spans] if posts >= servers else None

    out = {}
    (spans,) = eventually(exported, WAIT_S, 0.05, f"{servers} server span(s) to be exported")
    for s in spans:
        out.setdefault(f"{s.context.trace_id:032x}", []).append(s)
    return out


def ms(span):
    return (span.end_time - span.start_time) / 1e6


def check_chain(spans, timings, names):
    """The request's spans: one server span, ``ragserve.query`` under it, the stages under
    that, each as long as its stage in the result's ``timings`` (within 1 ms)."""
    server = [s for s in spans if s.kind.name == "SERVER"]
    assert len(server) == 1
    query = [s for s in spans if s.name == "ragserve.query"]
    assert len(query) == 1 and query[0].parent.span_id == server[0].context.span_id
    children = sorted((s for s in spans if s.parent is not None and s.parent.span_id == query[0].context.span_id),
                      key=lambda s: s.start_time)
    assert [s.name for s in children] == names
    for s in [*children, query[0]]:
        want = sum(-timings.get(st[1:], 0.0) if st[0] == "-" else timings.get(st, 0.0) for st in SPAN_OF[s.name])
        assert abs(ms(s) - want) <= 1.0, (s.name, ms(s), want)
    assert all(query[0].start_time <= s.start_time and s.end_time <= query[0].end_time for s in children)
    return server[0], query[0], {s.name: s for s in children}


def test_each_request_is_one_trace_continuing_the_callers_with_the_stage_chain(tmp_path, caplog):
    with served(tmp_path) as (url, exporter, tracing), caplog.at_level(logging.INFO, logger="ragserve.access"):
        miss = post(url + "/v1/query", json={"question": "chunk number 3"},
                    headers={"traceparent": TRACEPARENT, "X-Request-Id": "req-miss"}).json()
        hit = post(url + "/v1/query", json={"question": "chunk number 3"}, headers={"X-Request-Id": "req-hit"}).json()
        traces = spans_by_trace(exporter, tracing, servers=2)
    assert (miss["cache_tier"], hit["cache_tier"]) == ("miss", "l1")
    assert len(traces) == 2 and TRACE in traces  # one trace per request; the caller's continued
    server, query, stages = check_chain(traces[TRACE], miss["timings"], MISS_CHAIN)
    assert server.name == "POST /v1/query" and server.parent.span_id == int(CALLER, 16) and server.parent.is_remote
    assert server.attributes["http.response.status_code"] == 200 and server.attributes["http.route"] == "/v1/query"
    assert query.attributes["ragserve.request_id"] == "req-miss" and query.attributes["ragserve.cache.tier"] == "miss"
    chat = stages["chat fake-llm"].attributes
    assert chat["gen_ai.operation.name"] == "chat" and chat["gen_ai.request.model"] == "fake-llm"
    assert chat["gen_ai.usage.output_tokens"] == miss["usage"]["completion_tokens"] == 2
    assert chat["gen_ai.usage.input_tokens"] == miss["usage"]["prompt_tokens"]
    assert chat["gen_ai.latency.time_in_queue"] == pytest.approx(miss["timings"]["generate_queue"] / 1e3, abs=1e-5)
    assert chat["gen_ai.response.finish_reasons"] == ("stop",)
    retrieval = stages["retrieval"].attributes
    assert retrieval["gen_ai.data_source.id"] == miss["index_fingerprint"] and retrieval["gen_ai.retrieval.top_k"] == 3
    assert list(retrieval["ragserve.retrieval.scores"]) == pytest.approx([s["score"] for s in miss["sources"]])
    assert stages["ragserve.cache.lookup"].attributes["ragserve.cache.hit"] is False
    # Content stays out unless asked for.
    everything = [v for s in traces[TRACE] for v in s.attributes.values()]
    assert not any("chunk number" in str(v) for v in everything) and not any(miss["answer"] == v for v in everything)
    # The L1 hit: a new trace (no traceparent), the lookup only, tier in the attribute.
    (hit_trace,) = [t for t in traces if t != TRACE]
    _, hit_query, hit_stages = check_chain(traces[hit_trace], hit["timings"], ["ragserve.cache.lookup"])
    assert hit_stages["ragserve.cache.lookup"].attributes["ragserve.cache.tier"] == "l1"
    assert hit_stages["ragserve.cache.lookup"].attributes["ragserve.cache.hit"] is True
    # ... and links to the span that generated the answer it served: the miss's chat span.
    assert_origin_link(hit_stages["ragserve.cache.lookup"], stages["chat fake-llm"], "l1")
    lines = [r.getMessage() for r in caplog.records if r.name == "ragserve.access"]
    assert any(line.startswith("req-miss POST /v1/query 200") and line.endswith(f"trace={TRACE}") for line in lines)
    assert any(line.startswith("req-hit ") and f"trace={hit_trace}" in line for line in lines)


def test_content_is_recorded_only_with_capture_content(tmp_path):
    with served(tmp_path, capture_content=True) as (url, exporter, tracing):
        r = post(url + "/v1/query", json={"question": "chunk number 5"}).json()
        (spans,) = spans_by_trace(exporter, tracing).values()
    by_name = {s.name: s.attributes for s in spans}
    assert by_name["ragserve.query"]["ragserve.question"] == "chunk number 5"
    assert by_name["ragserve.query"]["ragserve.answer"] == r["answer"]
    assert r["sources"][0]["text"] in by_name["retrieval"]["gen_ai.retrieval.documents"]
    assert r["answer"] in by_name["chat fake-llm"]["gen_ai.output.messages"]


def test_the_openai_compatible_route_is_traced_too(tmp_path):
    with served(tmp_path) as (url, exporter, tracing):
        r = post(url + "/v1/chat/completions", headers={"traceparent": TRACEPARENT},
                 json={"model": "ragserve", "messages": [{"role": "user", "content": "chunk number 2"}]})
        assert r.status_code == 200
        traces = spans_by_trace(exporter, tracing)
    server = [s for s in traces[TRACE] if s.kind.name == "SERVER"]
    assert [s.name for s in server] == ["POST /v1/chat/completions"]
    assert {s.name for s in traces[TRACE]} >= {"ragserve.query", "chat fake-llm", "retrieval"}


def test_a_single_flight_follower_links_to_its_leader(tmp_path):
    gen = FakeGenerator()
    with served(tmp_path, gen) as (url, exporter, tracing):
        gen.hold = True
        leader_tp = f"00-{'a' * 32}-{'1' * 16}-01"
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, url + "/v1/query", json={"question": "chunk number 7"},
                                headers={"traceparent": leader_tp, "X-Request-Id": "leader"})
            eventually(lambda: gen.running == 1, what="the leader's generation to start")
            second = pool.submit(post, url + "/v1/query", json={"question": "chunk number 7"},
                                 headers={"traceparent": f"00-{'b' * 32}-{'2' * 16}-01", "X-Request-Id": "follower"})
            eventually(lambda: tracing_flight(url), what="the follower to join")
            gen.hold = False
            a, b = first.result().json(), second.result().json()
        traces = spans_by_trace(exporter, tracing, servers=2)
    assert (a["shared"], b["shared"]) == (False, True) and len(gen.prompts) == 1
    check_chain(traces["a" * 32], a["timings"], MISS_CHAIN)  # the run is in the leader's trace
    _, query, stages = check_chain(traces["b" * 32], b["timings"],
                                   ["ragserve.cache.lookup", "ragserve.single_flight.join"])
    join = stages["ragserve.single_flight.join"]
    leader_server = next(s for s in traces["a" * 32] if s.kind.name == "SERVER")
    assert query.attributes["ragserve.single_flight.leader"] == join.attributes["ragserve.single_flight.leader"] == "leader"
    assert [link.context.span_id for link in join.links] == [leader_server.context.span_id]
    assert [link.context.trace_id for link in join.links] == [int("a" * 32, 16)]
    assert join.attributes["ragserve.run.generate_ms"] == b["timings"]["generate"]


def assert_origin_link(span, generation, tier):
    """``span`` (a hit's lookup) has one link, to ``generation`` (the span that generated the
    answer it served), named as such."""
    (link,) = span.links
    assert (link.context.trace_id, link.context.span_id) == (generation.context.trace_id,
                                                              generation.context.span_id)
    assert dict(link.attributes) == {"ragserve.link": "cache.origin", "ragserve.cache.tier": tier}


@contextmanager
def traced_library(tmp_path, **sections):
    """A ``RAG`` on fakes called as a library, and a ``Tracing`` to add as its observer."""
    exporter = InMemorySpanExporter()
    with fake_rag(tmp_path, FakeGenerator(), **sections) as rag:
        tracing = make_tracing(rag.config, exporter)
        try:
            yield rag, tracing, exporter
        finally:
            tracing.shutdown()


def spans_of(exporter, tracing):
    """The spans exported so far, by trace id, each trace's by name."""
    assert tracing.flush()
    out = {}
    for s in exporter.get_finished_spans():
        out.setdefault(s.context.trace_id, {})[s.name] = s
    return out


def test_a_library_calls_hits_link_to_the_generation_and_an_untraced_origin_gives_none(tmp_path):
    with traced_library(tmp_path) as (rag, tracing, exporter):
        untraced = rag.query("chunk number 4")  # tracing not yet on: its answer names no span
        rag.observers.add(tracing)
        miss = rag.query("chunk number 5")
        hit = rag.query("chunk number 5")
        old_hit = rag.query("chunk number 4")
        traces = spans_of(exporter, tracing)
    tiers = (untraced.cache_tier, miss.cache_tier, hit.cache_tier, old_hit.cache_tier)
    assert tiers == ("miss", "miss", "l1", "l1")
    (generation,) = [t["chat fake-llm"] for t in traces.values() if "chat fake-llm" in t]
    assert miss.origin_span is not None and hit.origin_span == miss.origin_span
    assert int(miss.origin_span.span_id, 16) == generation.context.span_id
    assert "origin_span" not in hit.to_dict() and hit.answer == miss.answer  # the answer is the answer
    lookups = [t["ragserve.cache.lookup"] for t in traces.values() if t["ragserve.query"].attributes[
        "ragserve.cache.tier"] == "l1"]
    assert len(lookups) == 2
    linked = [s for s in lookups if s.links]
    assert len(linked) == 1 and old_hit.origin_span is None  # the untraced origin: no link
    assert_origin_link(linked[0], generation, "l1")


@pytest.mark.redis
def test_an_l2_hit_in_another_rag_links_to_the_generation_in_the_first(tmp_path):
    from ragserve.testing.redis import redis_server

    with redis_server() as server:
        cache = {"redis_url": server.url, "l2_timeout_ms": 1000 * WAIT_S}  # a loaded machine's bound
        with traced_library(tmp_path / "a", cache=cache) as (first, tracing_a, exporter_a), \
                traced_library(tmp_path / "b", cache=cache) as (second, tracing_b, exporter_b):
            first.observers.add(tracing_a)
            second.observers.add(tracing_b)
            miss = first.query("chunk number 6")
            first.flush_cache()  # the L2 write runs in the background
            hit = second.query("chunk number 6")  # its own L1 is empty: from Redis
            (generating,) = spans_of(exporter_a, tracing_a).values()
            (hitting,) = spans_of(exporter_b, tracing_b).values()
    assert (miss.cache_tier, hit.cache_tier) == ("miss", "l2")
    assert_origin_link(hitting["ragserve.cache.lookup"], generating["chat fake-llm"], "l2")


def test_a_semantic_hit_has_its_embedding_and_lookup_spans_and_links_to_the_generation(tmp_path):
    from ragserve.testing.fakes import WordsEmbedder

    exporter = InMemorySpanExporter()
    with fake_rag(tmp_path, FakeGenerator(), embedder=WordsEmbedder(), prompt={"max_score_gap": 0},
                  semantic={"enabled": True, "threshold": 0.75, "guard": "entities"}) as rag:
        tracing = make_tracing(rag.config, exporter)
        rag.observers.add(tracing)
        try:
            miss = rag.query("who founded the company?")
            hit = rag.query("please tell me who founded the company?")
            traces = spans_of(exporter, tracing)
        finally:
            tracing.shutdown()
    assert (miss.cache_tier, hit.cache_tier) == ("miss", "semantic")
    (generating,) = [t for t in traces.values() if "chat fake-llm" in t]
    (hitting,) = [t for t in traces.values() if "ragserve.cache.semantic" in t]
    semantic = hitting["ragserve.cache.semantic"]
    assert_origin_link(semantic, generating["chat fake-llm"], "semantic")
    assert semantic.attributes["ragserve.cache.semantic.similarity"] == hit.semantic_similarity
    assert not hitting["ragserve.cache.lookup"].links  # the exact tiers missed
    timings = hit.timings.as_dict()
    for name, stage in (("ragserve.cache.semantic", "cache_semantic"), ("embeddings default", "embed"),
                        ("ragserve.embed_wait", "embed_wait")):
        span = hitting[name]
        assert span.parent.span_id == hitting["ragserve.query"].context.span_id
        assert abs(ms(span) - timings[stage]) <= 1.0, (name, ms(span), timings[stage])
    assert hitting["ragserve.cache.lookup"].end_time <= hitting["ragserve.embed_wait"].start_time
    assert semantic.end_time <= hitting["ragserve.query"].end_time


def tracing_flight(url):
    return get(url + "/v1/stats").json().get("single_flight", {}).get("shared", 0) >= 1


def test_the_openai_backend_sends_traceparent_on_to_the_remote_server(tmp_path):
    from ragserve.generators.openai import OpenAIGenerator
    from ragserve.testing.fake_openai import FakeOpenAI

    fake = FakeOpenAI()
    with running(fake.app) as remote:
        config = RAGConfig().replace(generate={"backend": "openai", "max_tokens": 8},
                                     openai={"urls": [remote], "model": "fake-model"})
        gen = OpenAIGenerator(config.generate, config.openai, tokenizer=FakeGenerator().tokenizer())
        with served(tmp_path, gen, generate={"backend": "openai", "max_tokens": 8},
                    openai={"urls": [remote], "model": "fake-model"}) as (url, exporter, tracing):
            r = post(url + "/v1/query", json={"question": "chunk number 1"}, headers={"traceparent": TRACEPARENT})
            assert r.status_code == 200, r.text
            traces = spans_by_trace(exporter, tracing)
    sent = parse_traceparent(fake.headers[-1]["traceparent"])
    server = next(s for s in traces[TRACE] if s.kind.name == "SERVER")
    assert sent.trace_id == TRACE and sent.sampled and int(sent.span_id, 16) == server.context.span_id
    assert fake.headers[-1]["x-request-id"] == r.headers["x-request-id"]


def test_stage_histograms_carry_trace_ids_as_exemplars_in_openmetrics(tmp_path):
    with served(tmp_path) as (url, exporter, tracing):
        post(url + "/v1/query", json={"question": "chunk number 4"}, headers={"traceparent": TRACEPARENT})
        om = get(url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        plain = get(url + "/metrics")
    assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith("# EOF\n")
    lines = [line for line in om.text.splitlines()
             if line.startswith("ragserve_stage_duration_seconds_bucket") and f'trace_id="{TRACE}"' in line]
    assert any('stage="generate"' in line for line in lines) and any('stage="total"' in line for line in lines)
    assert "trace_id" not in plain.text and plain.headers["content-type"].startswith("text/plain")


def test_an_unsampled_caller_gets_no_spans_and_no_exemplar(tmp_path):
    with served(tmp_path) as (url, exporter, tracing):
        post(url + "/v1/query", json={"question": "chunk number 6"}, headers={"traceparent": f"00-{TRACE}-{CALLER}-00"})
        om = get(url + "/metrics", headers={"Accept": "application/openmetrics-text"})
        assert spans_by_trace(exporter, tracing, servers=0) == {}
    assert "trace_id" not in om.text


# -- OTLP/HTTP for real ------------------------------------------------------------------


@contextmanager
def otlp_receiver():
    """An OTLP/HTTP receiver on loopback: keeps each POST's path, headers and protobuf body."""
    posts, got = [], threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()
            got.set()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", posts
    finally:
        server.shutdown()
        server.server_close()


def test_spans_reach_an_otlp_http_receiver_as_protobuf(tmp_path):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    with otlp_receiver() as (endpoint, posts):
        config = RAGConfig().replace(telemetry={"traces": "otlp", "endpoint": endpoint + "/v1/traces",
                                                "service_name": "ragserve-test"})
        rag = fake_rag(tmp_path / "idx", config=config)
        try:
            with running(create_app(rag, config)) as url:  # the app makes (and shuts down) its own tracing
                r = post(url + "/v1/query", json={"question": "chunk number 2"}, headers={"traceparent": TRACEPARENT})
                assert r.status_code == 200
        finally:
            rag.close()
        eventually(lambda: posts, what="an OTLP export")
    spans, services = [], set()
    for path, headers, body in posts:
        assert path == "/v1/traces" and headers["content-type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            services |= {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
            spans += [s for ss in rs.scope_spans for s in ss.spans]
    assert services == {"ragserve-test"}
    assert {s.trace_id.hex() for s in spans} == {TRACE}
    names = {s.name for s in spans}
    assert names >= {"POST /v1/query", "ragserve.query", "retrieval", "chat fake-llm", "embeddings default"}
    query = next(s for s in spans if s.name == "ragserve.query")
    assert abs((query.end_time_unix_nano - query.start_time_unix_nano) / 1e6 - r.json()["timings"]["total"]) <= 1


def test_the_otlp_exporter_gathers_small_batches_into_one_request_and_flush_sends_the_rest():
    """The tracing thread hands spans over a few at a time; the exporter encodes them at
    once and sends one request per ``send_at`` spans, the same bytes as one batch of them."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, TraceFlags

    from ragserve.observe.otlp import OTLPExporter, encode_spans

    other = Resource.create({"service.name": "other"})
    spans = [ReadableSpan(f"s{i}", SpanContext(int(TRACE, 16), i + 1, False, TraceFlags(1)),
                          resource=other if i % 5 == 0 else Resource.create({"service.name": "x"}))
             for i in range(15)]
    with otlp_receiver() as (endpoint, posts):
        exporter = OTLPExporter(endpoint=endpoint + "/v1/traces", send_at=10)
        for i in range(0, 12, 4):
            exporter.export(spans[i:i + 4])
        assert [body for _, _, body in posts] == [encode_spans(spans[:12])]  # sent at 12 >= 10
        exporter.export(spans[12:])
        assert len(posts) == 1
        assert exporter.force_flush() and [body for _, _, body in posts][1:] == [encode_spans(spans[12:])]
        assert exporter.force_flush() and len(posts) == 2  # nothing waits: nothing sent
        exporter.export(spans[:1])
        exporter.shutdown()  # sends what waits
        assert len(posts) == 3


def test_the_otlp_payload_decodes_to_what_the_sdks_encoder_makes(tmp_path):
    """``observe/otlp.py`` writes the protobuf itself: for a request's real spans and for
    spans with every kind of value, link, event, status and parent, the bytes decode to the
    very message the SDK's encoder builds."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

    from ragserve.observe.otlp import encode_spans

    with served(tmp_path, capture_content=True) as (url, exporter, tracing):
        post(url + "/v1/query", json={"question": "chunk number 3"}, headers={"traceparent": TRACEPARENT})
        post(url + "/v1/query", json={"question": "chunk number 3"})
        spans = [s for t in spans_by_trace(exporter, tracing, servers=2).values() for s in t]
    state = TraceState([("k", "v"), ("a", "b")])
    remote = SpanContext(int(TRACE, 16), int(CALLER, 16), True, TraceFlags(1), state)
    ctx = SpanContext(int(TRACE, 16), 0x1234, False, TraceFlags(1))
    values = {"s": "é ∑ text", "e": "", "t": True, "f": False, "i": 7, "neg": -3, "big": 2**62, "x": 1.5,
              "z": 0.0, "b": b"\x00\x01", "ss": ("a", ""), "is": [1, -2], "fs": (0.5,), "bs": (True, False),
              "empty": (), "m": {"k": 1, "n": {"d": "e"}}, "none": None, "": "no key"}
    odd = [ReadableSpan("odd", ctx, remote, Resource.create({"service.name": "x", "n": 3}, "https://s/1"),
                        values, events=[Event("ev", {"a": 1}, timestamp=5), Event("", None, timestamp=0)],
                        links=[Link(remote, {"l": "x"}), Link(ctx)], kind=SpanKind.PRODUCER,
                        status=Status(StatusCode.ERROR, "broke"), start_time=1, end_time=2**63 + 5,
                        instrumentation_scope=InstrumentationScope("lib", "1.0", "https://s/2", {"sa": 1})),
           ReadableSpan("bare", ctx, None, Resource.create({}), None, kind=SpanKind.CONSUMER,
                        status=Status(StatusCode.OK)),
           ReadableSpan("", ctx)]
    for batch in (spans, odd, [*spans, *odd], []):
        assert ExportTraceServiceRequest.FromString(encode_spans(batch)) == sdk_encode(batch)
    assert len(spans) >= 11  # the miss's chain and the hit's


def test_spans_written_straight_to_otlp_decode_to_the_sdk_spans_of_the_same_requests(tmp_path):
    """With ragserve's OTLP exporter the spans are written from the notes as protobuf, never
    made as SDK spans (``spanbuild``): the same notes (a traced miss, its shared follower, a
    hit linking to it, a library call's miss and semantic hit, edge spans, one an error),
    laid out with the same ids, give the very message the SDK spans encode to."""
    import random

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from ragserve.observe.otlp import Payload
    from ragserve.observe.spanbuild import SpanBuilder
    from ragserve.testing.fakes import WordsEmbedder

    notes = []
    gen = FakeGenerator()
    with served(tmp_path, gen, capture_content=True) as (url, exporter, tracing):
        tracing._note = notes.append  # kept here, never built by the tracing thread
        gen.hold = True
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, url + "/v1/query", json={"question": "chunk number 7"},
                                headers={"traceparent": TRACEPARENT})
            eventually(lambda: gen.running == 1, what="the leader's generation to start")
            second = pool.submit(post, url + "/v1/query", json={"question": "chunk number 7"},
                                 headers={"traceparent": f"00-{'b' * 32}-{'2' * 16}-01"})
            eventually(lambda: tracing_flight(url), what="the follower to join")
            gen.hold = False
            assert first.result().status_code == second.result().status_code == 200
        assert post(url + "/v1/query", json={"question": "chunk number 7"}).json()["cache_tier"] == "l1"
        tracing.end(tracing.start("broken", parse_traceparent(TRACEPARENT), {"a": 1}, 5), 9, "Boom")
        builder = tracing._builder
        semantic = {"enabled": True, "threshold": 0.75, "guard": "entities"}
        with fake_rag(tmp_path / "lib", FakeGenerator(), embedder=WordsEmbedder(),
                      prompt={"max_score_gap": 0}, semantic=semantic) as rag:
            rag.observers.add(tracing)
            rag.query("who founded the company?")
            assert rag.query("please tell me who founded the company?").cache_tier == "semantic"
            rag.observers.remove(tracing)
        eventually(lambda: sum(len(n) == 3 for n in notes) >= 4, what="the server spans")  # 3 POSTs, 1 error
        out = []
        for encoded in (False, True):
            build = SpanBuilder(builder.resource, builder.scope, tracing.naming, tracing._sampled,
                                tracing._leader, encoded)
            random.seed(7)  # the same ids drawn, in the same order
            for note in notes:
                (build.request if len(note) == 4 else build.edge)(*note)
            out.append(build.take())
    sdk_spans, written = out
    payload = Payload()
    payload.add_encoded(builder.resource, builder.scope, written)
    names = {s.name for s in sdk_spans}
    assert {"ragserve.single_flight.join", "ragserve.cache.semantic", "chat fake-llm", "broken"} <= names
    assert len(written) == len(sdk_spans) >= 25
    assert ExportTraceServiceRequest.FromString(payload.serialize()) == sdk_encode(sdk_spans)


# -- Ray: the handle call carries the context ----------------------------------------------


class RecordingGenerator(FakeGenerator):
    """Records the traceparent its requests would send on (what the openai backend sends)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    async def generate(self, prompt, request_id, token_ids=None):
        from ragserve.observe.propagation import traceparent_for

        self.seen.append(traceparent_for(request_id))
        return await super().generate(prompt, request_id, token_ids)


async def test_the_ray_generator_replica_continues_the_ingress_trace():
    """Both halves of the handle call, without a cluster: the ingress's ``RayGenerator``
    sends the bound context as the call's argument, the replica's ``GeneratorServer``
    continues it (its own span with tracing on; passed on without)."""
    from ragserve.observe.propagation import bind, unbind
    from ragserve.ray.serve.client import RayGenerator
    from ragserve.ray.serve.generator import GeneratorServer

    calls = []

    class Handle:
        def options(self, stream=False):
            return self

        def __getattr__(self, name):
            class Method:
                def remote(self, *args):
                    calls.append(args)
                    return server.generate(*args)
            return Method()

    exporter = InMemorySpanExporter()
    class Server(GeneratorServer):
        def __del__(self):  # Serve awaits the async one; a test's garbage collector would not
            pass

    server = Server.__new__(Server)
    await server.__init__(RAGConfig().to_dict(), RecordingGenerator())  # Serve awaits its async __init__
    client = RayGenerator(Handle(), {"model_name": "fake-llm", "backend": "vllm", "alive": True}, tokenizer=None)
    token = bind("r1", parse_traceparent(TRACEPARENT))
    try:
        await client.generate("a prompt", "r1")  # no tracing in the replica: passed on as it came
        server.tracing = Tracing(exporter)
        await client.generate("a prompt", "r1")  # tracing in the replica: a span of its own
    finally:
        unbind("r1", token)
    assert [c[4] for c in calls] == [TRACEPARENT, TRACEPARENT]  # after (prompt, id, token_ids, priority)
    assert server.generator.seen[0] == TRACEPARENT
    server.tracing.flush()
    (span,) = exporter.get_finished_spans()
    assert span.name == "ragserve.generator" and span.parent.span_id == int(CALLER, 16)
    assert server.generator.seen[1] == f"00-{TRACE}-{span.context.span_id:016x}-01"
    await client.generate("a prompt", "r2")  # nothing bound: nothing sent
    assert calls[-1][4] is None and server.generator.seen[-1] is None
    await GeneratorServer.__del__(server)  # what Serve does when it stops the replica: tracing shut down too


# -- off is free ---------------------------------------------------------------------------


def test_with_tracing_off_no_request_imports_opentelemetry(tmp_path):
    code = f"""
import sys
from ragserve.config import RAGConfig
from ragserve.server.app import create_app
from ragserve.testing.fakes import fake_rag
from ragserve.testing.http import running, post, get
def otel():
    return {{m for m in sys.modules if m.startswith("opentelemetry")}}
rag = fake_rag({str(tmp_path / 'idx')!r})
with running(create_app(rag, RAGConfig())) as url:
    before = otel()  # the mcp SDK imports opentelemetry's API for its own use; ragserve nothing
    r = post(url + "/v1/query", json={{"question": "chunk number 1"}}, headers={{"traceparent": {TRACEPARENT!r}}})
    assert r.status_code == 200, r.text
    get(url + "/metrics", headers={{"Accept": "application/openmetrics-text"}})
rag.close()
print(sorted(otel() - before), sorted(m for m in otel() | set(sys.modules)
                                      if m.startswith(("opentelemetry.sdk", "ragserve.observe.traces"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[] []"


def test_telemetry_config_is_validated_and_otel_env_turns_it_on():
    from ragserve.config.telemetry import TelemetryConfig, trace_export
    from ragserve.errors import ConfigError

    with pytest.raises(ConfigError, match="telemetry.traces"):
        RAGConfig().replace(telemetry={"traces": "jaeger"})
    with pytest.raises(ConfigError, match="telemetry.sample_ratio"):
        RAGConfig().replace(telemetry={"sample_ratio": 1.5})
    with pytest.raises(ConfigError, match="telemetry.endpoint"):
        RAGConfig().replace(telemetry={"endpoint": "collector:4318"})
    assert trace_export(TelemetryConfig(), {}) == "off"
    assert trace_export(TelemetryConfig(), {"OTEL_TRACES_EXPORTER": "otlp"}) == "otlp"
    assert trace_export(TelemetryConfig(), {"OTEL_TRACES_EXPORTER": "none"}) == "off"
    assert RAGConfig.load(env={"RAGSERVE_TELEMETRY_TRACES": "otlp"}).telemetry.traces == "otlp"
    for bad in ("", "00-xyz", f"ff-{TRACE}-{CALLER}-01", f"00-{'0' * 32}-{CALLER}-01", f"00-{TRACE}-{'0' * 16}-01"):
        assert parse_traceparent(bad) is None



# -- structured logs -------------------------------------------------------------------------


def test_json_access_lines_carry_request_trace_tenant_outcome_tier_status_and_ms(tmp_path, caplog):
    import json

    from ragserve.server.auth import ApiKeys
    from ragserve.server.logs import JsonFormatter

    key = "k" * 32
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({key: "team-a"}))
    exporter = InMemorySpanExporter()
    config = RAGConfig().replace(server={"log_format": "json"})
    tracing = make_tracing(config, exporter)
    rag = fake_rag(tmp_path / "idx", config=config)
    auth = {"Authorization": f"Bearer {key}"}
    try:
        app = create_app(rag, config, keys=ApiKeys.load(keys_file), tracing=tracing)
        with running(app) as url, caplog.at_level(logging.INFO, logger="ragserve.access"):
            post(url + "/v1/query", json={"question": "chunk number 1"}, headers={**auth, "X-Request-Id": "j1",
                                                                                  "traceparent": TRACEPARENT})
            post(url + "/v1/query", json={"question": "chunk number 1"}, headers={**auth, "X-Request-Id": "j2"})
            post(url + "/v1/query", json={"question": ""}, headers={**auth, "X-Request-Id": "j3"})
            post(url + "/v1/query", json={"question": "q"}, headers={"X-Request-Id": "j4"})
            # The access line is written once the response is sent: the client can be first.
            eventually(lambda: {r.getMessage().split()[0] for r in caplog.records if r.name == "ragserve.access"}
                       >= {"j1", "j2", "j3", "j4"}, what="the four access lines")
    finally:
        tracing.shutdown()
        rag.close()
    lines = {d["request_id"]: d for d in (json.loads(JsonFormatter().format(r)) for r in caplog.records
                                          if r.name == "ragserve.access")}
    assert lines["j1"]["trace_id"] == TRACE and lines["j1"]["tenant"] == "team-a"
    assert (lines["j1"]["cache_tier"], lines["j2"]["cache_tier"]) == ("miss", "l1")
    assert (lines["j1"]["status"], lines["j1"]["outcome"]) == (200, "ok") and lines["j1"]["total_ms"] > 0
    assert (lines["j3"]["status"], lines["j3"]["outcome"], lines["j3"]["cache_tier"]) == (400, "invalid", None)
    assert (lines["j4"]["status"], lines["j4"]["tenant"]) == (401, None)  # no key: no tenant
    assert key not in json.dumps(lines) and all(d["level"] == "INFO" for d in lines.values())
    with pytest.raises(Exception, match="server.log_format"):
        RAGConfig().replace(server={"log_format": "xml"})


def test_a_stuck_exporter_never_holds_a_request_and_what_waits_for_it_is_bounded(tmp_path):
    import time

    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from ragserve.observe import traces

    class Stuck(SpanExporter):
        def __init__(self):
            self.release, self.calls = threading.Event(), 0

        def export(self, spans):
            self.calls += 1
            self.release.wait(60)
            return SpanExportResult.FAILURE

    rag = fake_rag(tmp_path / "idx")
    try:
        result = rag.query("chunk number 2")
    finally:
        rag.close()
    stuck = Stuck()
    tracing = Tracing(stuck)
    try:
        tracing.on_result(result, result.timings.as_dict())
        tracing._wake.set()
        eventually(lambda: stuck.calls, what="the tracing thread to be stuck in the exporter")
        t0 = time.monotonic()
        for _ in range(traces._MAX_PENDING + 100):
            tracing.on_result(result, result.timings.as_dict())
        # A note, never a wait on the exporter: every call returned while the exporter is
        # still in its first export, which lasts 60 s (a generous bound, not a speed test).
        assert time.monotonic() - t0 < 30 and stuck.calls == 1 and not stuck.release.is_set()
        assert tracing.dropped == 100
    finally:
        stuck.release.set()
        tracing.shutdown()
