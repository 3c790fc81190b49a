"""Property-based tests of the HTTP API (issue 28): hypothesis draws bodies and headers for
``/v1/query``, ``/v1/retrieve`` and ``/v1/chat/completions`` and sends them as raw bytes to
a real server on loopback (fake models, API keys on, ``ragserve serve``'s connection
limits). The property is ``ragserve.testing.fuzz.problem``'s, the one the 10,000-request
benchmark judges by: a 2xx whose JSON parses or whose stream ends, or a 4xx with the typed
error body; never a 5xx, never a hang, no trace or server path in an error body. Nothing
is logged at ERROR by the server meanwhile, and /metrics gains no label from a request.

Two ways of drawing: JSON bodies hypothesis builds itself (valid fields with values of any
JSON type, unknown fields, removed fields) with headers of its own; and the fuzz module's
hostile categories with every choice drawn by hypothesis (``st.randoms``), so a failure
shrinks to its smallest case."""

from __future__ import annotations

import asyncio
import json
import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragserve.config import RAGConfig
from ragserve.server.app import create_app
from ragserve.server.auth import ApiKeys
from ragserve.testing import fuzz
from ragserve.testing.fakes import FakeGenerator
from ragserve.testing.fakes import fake_rag as make_rag
from ragserve.testing.http import get, running
from tests.test_http_fuzz import Errors

pytestmark = pytest.mark.http

KEY = "hypothesis-key-0123456789abcdef"
ANSWER_S = 10.0
"""A whole answer within this (they take milliseconds; a hang costs this much per shrinking step)."""

def _settings(examples: int):
    """Bounded and the same on every run (derandomized, no example database): together the
    two property tests take ~20 s here."""
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


FIELDS = {"/v1/query": ("question", "namespace", "top_k", "cache", "timeout_s", "stream"),
          "/v1/retrieve": ("question", "top_k"),
          "/v1/chat/completions": ("model", "messages", "stream", "stream_options", "max_tokens",
                                   "temperature", "top_p", "n", "user", "stop", "seed")}
HEADERS = ("Content-Type", "Authorization", "X-Request-Id", "X-Priority", "Accept", "Accept-Encoding",
           "Expect", "X-Forwarded-For", "traceparent", "tracestate", "Cookie", "Origin", "Range", "X-Api-Key")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = RAGConfig().replace(server={"body_timeout_s": 0.5, "header_timeout_s": 2.0})
    rag = make_rag(tmp_path_factory.mktemp("hypothesis"), FakeGenerator(words=3, delay=0.0), config=config)
    errors = Errors()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "ragserve")]
    for lg in loggers:
        lg.addHandler(errors)
    try:
        app = create_app(rag, config, keys=ApiKeys({KEY: "tenant"}))
        with rag, running(app, limits=config.server) as url:
            yield int(url.rsplit(":", 1)[1]), url
            assert get(f"{url}/health").status_code == 200
            assert fuzz.label_problems(get(f"{url}/metrics").text, fuzz.known_labels()) == []
    finally:
        for lg in loggers:
            lg.removeHandler(errors)
    assert not [e.getMessage() for e in errors.records][:3]


def _judge(port: int, req: fuzz.FuzzRequest) -> fuzz.Answer:
    (_, answer, problem), = asyncio.run(fuzz.run(port, [req], concurrency=1, timeout_s=ANSWER_S))
    assert problem is None, (req.endpoint, req.detail, problem, req.raw[:300])
    return answer


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),  # any byte but CR, LF
    st.sampled_from(["application/json", "text/plain", "Bearer " + KEY, "Bearer x", "100-continue", "high",
                     "-1", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]))


@st.composite
def drawn_requests(draw):
    endpoint = draw(st.sampled_from(fuzz.ENDPOINTS))
    body = fuzz.valid_body(endpoint, draw(st.randoms(use_true_random=False)))
    for name in draw(st.sets(st.sampled_from(FIELDS[endpoint]), max_size=2)):
        body.pop(name, None)
    body.update(draw(st.dictionaries(st.sampled_from(FIELDS[endpoint]) | st.text(max_size=12), json_values,
                                     max_size=3)))
    if endpoint == "/v1/chat/completions" and draw(st.booleans()):
        body["messages"] = draw(st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": json_values}),
            max_size=3))
    data = json.dumps(body, ensure_ascii=draw(st.booleans()), allow_nan=True).encode("utf-8", "surrogatepass")
    names = st.sampled_from(HEADERS) | st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z")
    headers = draw(st.lists(st.tuples(names, header_values), max_size=4))
    headers = [(n, v) for n, v in headers
               if n.lower() not in ("content-length", "transfer-encoding", "connection", "host")]
    return fuzz.raw_request(endpoint, data, headers, key=None if draw(st.integers(0, 9)) == 0 else KEY,
                            detail=json.dumps(sorted(body))[:200])


def test_drawn_bodies_and_headers_get_a_2xx_or_a_typed_4xx(server):
    port, url = server
    statuses = set()

    @_settings(100)
    @given(req=drawn_requests())
    def check(req):
        statuses.add(_judge(port, req).status)

    check()
    assert {200, 422} <= statuses, statuses  # some answered, some refused by the schema: both paths ran
    assert get(f"{url}/health").status_code == 200


def test_the_fuzz_categories_drawn_by_hypothesis_get_typed_answers(server):
    port, url = server
    statuses = set()

    @_settings(150)
    @given(rnd=st.randoms(use_true_random=False), endpoint=st.sampled_from(fuzz.ENDPOINTS),
           category=st.sampled_from(fuzz.CATEGORIES), keyed=st.booleans())
    def check(rnd, endpoint, category, keyed):
        statuses.add(_judge(port, fuzz.request(rnd, endpoint, category, KEY if keyed else None)).status)

    check()
    assert {200, 400, 401, 422} <= statuses, statuses
    assert get(f"{url}/health").status_code == 200


def test_request_refuses_an_unknown_category():
    with pytest.raises(ValueError, match="no fuzz category 'nope'"):
        fuzz.request(random.Random(0), "/v1/query", "nope")
