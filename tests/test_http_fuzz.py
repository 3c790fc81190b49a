"""Fuzzing the HTTP API against a real server on loopback with fake models behind it:
bodies drawn from its own OpenAPI schema (schemathesis + hypothesis), and hostile raw bytes
that no schema would draw (``ragserve/testing/fuzz.py``). Whatever comes, no 500, never a
stack trace, every error in the typed shape, and the server stays up."""

import asyncio
import contextlib
import logging
import socket

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from ragserve.config import RAGConfig
from ragserve.server.app import create_app
from ragserve.server.auth import ApiKeys
from ragserve.testing import fuzz
from ragserve.testing.fakes import FakeGenerator
from ragserve.testing.fakes import fake_rag as make_rag
from ragserve.testing.http import get, running
from ragserve.testing.waits import WAIT_S, eventually

pytestmark = pytest.mark.http


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    rag = make_rag(tmp_path_factory.mktemp("fuzz"), FakeGenerator(words=2, delay=0.0))
    with rag, running(create_app(rag, RAGConfig())) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json"), url


def test_no_input_makes_the_server_fail(api):
    """Every operation of the schema, with bodies hypothesis draws from it (valid and not)."""
    schema, url = api
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/query", "/v1/retrieve", "/v1/chat/completions"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=url, timeout=30)
            # 504 (a drawn deadline of 1e-50 s) and 429 are answers; a 500 is a bug
            assert response.status_code != 500, (op.path, response.status_code, response.text[:500])
            assert "Traceback" not in response.text
            if response.status_code >= 400:
                assert fuzz.error_body_ok(response.json()["error"]), response.text[:300]

        check()
        assert get(f"{url}/health").status_code == 200, f"the server went down after {op.path}"


# -- hostile bytes, seed-fixed (ragserve/testing/fuzz.py; 10,000 of them: benchmarks/bench_fuzz.py) --

KEY = "fuzz-key-0123456789abcdef"
SAMPLE = 300
SEED = 28


class Errors(logging.Handler):
    """ERROR records of the server's loggers (uvicorn's do not reach the root logger)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_hostile_requests_get_typed_answers_and_the_server_stays_up(tmp_path):
    """Malformed JSON, wrong types, hostile strings, bad headers and framing on the three
    answering endpoints: every answer a 2xx or a typed 4xx, none a 5xx, none late, nothing
    from the server's insides in a body, no ERROR in its log, no label in /metrics from a
    request; /health is 200 after."""
    config = RAGConfig().replace(server={"body_timeout_s": 1.0, "header_timeout_s": 2.0})
    rag = make_rag(tmp_path, FakeGenerator(words=3, delay=0.0), config=config)
    errors = Errors()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "ragserve")]
    for lg in loggers:
        lg.addHandler(errors)
    try:
        with rag, running(create_app(rag, config, keys=ApiKeys({KEY: "tenant"})), limits=config.server) as url:
            reqs = list(fuzz.requests(SEED, SAMPLE, KEY))
            results = asyncio.run(fuzz.run(int(url.rsplit(":", 1)[1]), reqs, concurrency=8, timeout_s=WAIT_S))
            assert get(f"{url}/health").status_code == 200
            assert fuzz.label_problems(get(f"{url}/metrics").text, fuzz.known_labels()) == []
    finally:
        for lg in loggers:
            lg.removeHandler(errors)
    bad = [(r.endpoint, r.category, r.detail, p) for r, _, p in results if p]
    assert not bad, bad[:5]
    assert {r.endpoint for r in reqs} == set(fuzz.ENDPOINTS)
    assert {r.category for r in reqs} >= {"valid", "wrong_type", "strings", "malformed", "headers", "framing"}
    statuses = {a.status for _, a, _ in results}
    assert {200, 400, 401, 422} <= statuses  # answered, refused by the engine, the key, the schema
    assert not [e.getMessage() for e in errors.records][:3]


def test_bytes_that_are_not_http_after_a_request_wait_for_its_answer(tmp_path):
    """A stream under way, then bytes that are not HTTP on the same connection (what a
    Content-Length that lies short leaves): the stream ends whole, then the 400 follows.
    Found by the fuzz: the 400 was written into the stream and ended the connection, and
    the stream's next write failed (a traceback in the server's log)."""
    gen = FakeGenerator(words=3, delay=0.0)
    gen.hold = True
    rag = make_rag(tmp_path, gen)
    errors = Errors()
    logging.getLogger("uvicorn.error").addHandler(errors)
    try:
        app = create_app(rag, RAGConfig())
        with rag, running(app) as url:
            s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=WAIT_S)
            body = b'{"question": "what is this?", "stream": true}'
            s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            data = s.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 ")  # the stream began; its tokens are held
            s.sendall(b"\x00 not http\r\n\r\n")
            counts = app.state.served.connections.counts
            eventually(lambda: counts["invalid_request"] == 1, WAIT_S, 0.02, "the server to refuse the bytes")
            gen.hold = False
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(65536):
                    data += chunk
            s.close()
            assert get(f"{url}/health").status_code == 200
    finally:
        logging.getLogger("uvicorn.error").removeHandler(errors)
    stream, _, refusal = data.partition(b"\r\n0\r\n\r\n")  # the stream's last chunk
    assert b"event: done" in stream
    assert refusal.startswith(b"HTTP/1.1 400 ") and b'"InvalidHTTP"' in refusal
    assert not [e.getMessage() for e in errors.records]


BROKEN_CHUNKS = {"first_chunk": b"zz\r\n", "second_chunk": b"5\r\n{\"que\r\nzz\r\n"}


def test_a_chunked_body_that_breaks_is_refused_at_once(tmp_path):
    """Found by tests/test_http_hypothesis.py (the fuzz's bad_chunked framing): a chunk
    size that is not hex, in a request whose headers were whole. The 400 was held back
    until the request's answer was complete, but its app was waiting for the rest of a body
    that would never come: no answer, the connection and the request held until the
    client gave up (the body deadline had been cancelled with the refusal)."""
    config = RAGConfig()
    rag = make_rag(tmp_path, FakeGenerator(words=3, delay=0.0), config=config)
    errors = Errors()
    logging.getLogger("uvicorn.error").addHandler(errors)
    try:
        app = create_app(rag, config)
        with rag, running(app, limits=config.server) as url:
            port = int(url.rsplit(":", 1)[1])
            head = (b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            cases = [(broken, stream) for broken in sorted(BROKEN_CHUNKS) for stream in (False, True)]
            for broken, stream in cases:
                body = b'{"question": "what is this?", "stream": %s}' % (b"true" if stream else b"false")
                raw = head + BROKEN_CHUNKS[broken] + body
                answer = asyncio.run(fuzz.send(port, raw, WAIT_S))
                assert answer.status == 400 and answer.error == "", (broken, stream, answer.status)
                assert b'"InvalidHTTP"' in answer.body
                assert fuzz.problem(fuzz.FuzzRequest("/v1/query", "framing", broken, raw), answer) is None
                assert answer.seconds < WAIT_S / 2  # at once, not when a deadline ends it
            served = app.state.served
            eventually(lambda: served.connections.counts["invalid_request"] == len(cases), WAIT_S, 0.02,
                       "the refusals")
            assert get(f"{url}/health").status_code == 200
            eventually(lambda: len(served.connections.live) == 0, WAIT_S, 0.02, "every connection closed")
    finally:
        logging.getLogger("uvicorn.error").removeHandler(errors)
    assert not [e.getMessage() for e in errors.records]
