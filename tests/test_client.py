"""``ragserve.client`` against a real uvicorn server on loopback, with fake models behind
it (the same against the real engine: test_client_engine.py): the same types as the
in-process API, retries that honour ``Retry-After`` within their bound, and the server's
errors back as the same typed errors."""

import asyncio
import pickle
import subprocess
import sys
import time

import orjson
import pytest

from ragserve import (
    AsyncClient,
    AuthError,
    Client,
    DeadlineExceededError,
    DoneEvent,
    EmptyQuestionError,
    GenerationError,
    GeneratorUnavailableError,
    InvalidParameterError,
    OverloadedError,
    QueryResult,
    QuestionTypeError,
    RemoteError,
    ServerUnreachableError,
    Source,
    SourcesEvent,
    TokenEvent,
)
from ragserve.cache.redis_server import free_port
from ragserve.client import Retries
from ragserve.client.failures import from_body
from ragserve.client.retries import retry_after_s
from ragserve.config import RAGConfig
from ragserve.errors import (
    EngineDeadError,
    IndexNotFoundError,
    InputError,
    QuestionTooLongError,
)
from ragserve.server.app import create_app
from ragserve.server.auth import ApiKeys
from ragserve.server.httperrors import body, describe
from ragserve.testing.fakes import FakeGenerator
from ragserve.testing.fakes import fake_rag as make_rag
from ragserve.testing.http import post, running
from ragserve.types import Generation, TokenUsage

pytestmark = pytest.mark.http

KEY = "tenant-a-key-0123456789"
FAST = Retries(backoff_s=0.01, max_backoff_s=0.05)
"""Retries whose own backoff is short: the waits a test sees are the server's Retry-After."""


class Counted:
    """An ASGI app counting the HTTP requests that reach ``app`` (every attempt of a
    client); ``after_first`` runs once the first one is answered."""

    def __init__(self, app, after_first=None):
        self.app, self.after_first, self.requests = app, after_first, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.requests.append(scope["path"])
        await self.app(scope, receive, send)
        if scope["type"] == "http" and len(self.requests) == 1 and self.after_first:
            self.after_first()


class Refusing:
    """A ``RAG`` whose first ``times`` queries (JSON or stream) raise ``error()`` before
    any work, as admission does when it is full."""

    def __init__(self, rag, times, error=lambda: OverloadedError(1, 0)):
        self.rag, self.times, self.error, self.calls = rag, times, error, 0

    def __getattr__(self, name):
        return getattr(self.rag, name)

    def _admit(self):
        self.calls += 1
        if self.calls <= self.times:
            raise self.error()

    async def aquery(self, question, **options):
        self._admit()
        return await self.rag.aquery(question, **options)

    def astream(self, question, **options):
        self._admit()
        return self.rag.astream(question, **options)


class FailingMidStream(FakeGenerator):
    """Answers its first piece, then fails the way a generation stage does."""

    async def stream(self, prompt, request_id, token_ids=None, deltas=True):
        yield "an"
        raise GenerationError("the model failed after its first piece")
        yield Generation("an", TokenUsage(1, 1), "stop")  # never: a generator's shape


@pytest.fixture
def rag(tmp_path):
    with make_rag(tmp_path, FakeGenerator(words=4, delay=0.05)) as r:
        yield r


@pytest.fixture
def url(rag):
    with running(create_app(rag, RAGConfig())) as base:
        yield base


def shape(events):
    """The event types in order, each run of token pieces as one (the server writes the
    pieces that reached it together as one event)."""
    out = []
    for e in events:
        if not (out and out[-1] is TokenEvent and type(e) is TokenEvent):
            out.append(type(e))
    return out


def same_sources(a, b):
    assert [(s.doc_id, s.chunk_id, s.text, s.metadata) for s in a] == \
        [(s.doc_id, s.chunk_id, s.text, s.metadata) for s in b]
    assert [s.score for s in a] == pytest.approx([s.score for s in b], abs=1e-5)
    assert all(isinstance(s, Source) for s in [*a, *b])


# --- every endpoint, the in-process types --------------------------------------------------


def test_query_returns_the_query_result_the_in_process_api_returns(url, rag):
    with Client(url) as client:
        remote = client.query("which chunk?", request_id="client-id-1", top_k=3)
    local = rag.query("which chunk?", top_k=3)  # the same key: the remote's answer, from L1
    assert isinstance(remote, QueryResult) and remote.request_id == "client-id-1"
    assert remote.cache_tier == "miss" and local.cache_tier == "l1"
    assert remote.answer == local.answer == "an answer more more"
    same_sources(remote.sources, local.sources)
    assert remote.sources  # (the fake index drops the chunks of score 0)
    assert (remote.model, remote.index_fingerprint, remote.usage, remote.finish_reason) == \
        (local.model, local.index_fingerprint, local.usage, local.finish_reason)
    assert remote.timings.generate > 0 and remote.timings.total >= remote.timings.generate


def test_query_result_from_dict_is_the_inverse_of_to_dict(rag):
    r = rag.query("round trip")
    assert QueryResult.from_dict(r.to_dict()).to_dict() == r.to_dict()
    assert QueryResult.from_dict({**r.to_dict(), "a_newer_field": 1}).answer == r.answer


def test_stream_yields_the_in_process_stream_event_types(url, rag):
    with Client(url) as client:
        remote = list(client.stream("stream me", cache_read=False, cache_write=False))
        local = list(rag.stream("stream me", cache_read=False, cache_write=False))
        assert shape(remote) == shape(local) == [SourcesEvent, TokenEvent, DoneEvent]
        assert remote[0].cache_tier == local[0].cache_tier == "miss"
        same_sources(remote[0].sources, local[0].sources)
        tokens = "".join(e.text for e in remote if isinstance(e, TokenEvent))
        assert tokens == remote[-1].result.answer == local[-1].result.answer
        assert isinstance(remote[-1].result, QueryResult) and remote[-1].result.sources == remote[0].sources
        client.query("hit me")
        hit = list(client.stream("hit me"))
    assert shape(hit) == [SourcesEvent, TokenEvent, DoneEvent] and hit[0].cache_tier == "l1"


def test_retrieve_and_stats(url, rag):
    with Client(url) as client:
        sources = client.retrieve("anything", top_k=2)
        same_sources(sources, rag.retrieve("anything", 2))
        assert len(sources) == 2
        client.query("counted")
        stats = client.stats()
    assert stats["queries"] == 1 and stats["stages"]["generate"]["count"] == 1


def test_a_question_that_is_not_text_is_refused_before_sending(url):
    with Client(url) as client, pytest.raises(QuestionTypeError) as caught:
        client.query(b"bytes")  # type: ignore[arg-type]
    assert caught.value.status is None and caught.value.attempts == 0  # the same attributes, nothing sent


# --- retries ---------------------------------------------------------------------------------


def test_a_429_is_tried_again_after_its_retry_after_and_then_answered(rag):
    refusing = Refusing(rag, times=1)
    app = Counted(create_app(refusing, RAGConfig().replace(server={"retry_after_s": 1})))
    with running(app) as url, Client(url, retries=FAST) as client:
        t0 = time.monotonic()
        r = client.query("patience")
        waited = time.monotonic() - t0
    assert r.answer == "an answer more more"
    assert refusing.calls == 2 and app.requests == ["/v1/query"] * 2
    assert waited >= 1.0  # the server's Retry-After, never less (jitter only adds)


def test_a_refused_stream_is_tried_again_before_its_first_event(rag):
    refusing = Refusing(rag, times=1)
    app = Counted(create_app(refusing, RAGConfig().replace(server={"retry_after_s": 1})))
    with running(app) as url, Client(url, retries=FAST) as client:
        t0 = time.monotonic()
        events = client.stream("patience, streamed")
        waited = time.monotonic() - t0
        assert shape(list(events)) == [SourcesEvent, TokenEvent, DoneEvent]
    assert refusing.calls == 2 and len(app.requests) == 2 and waited >= 1.0


def test_a_503_is_tried_again(rag):
    refusing = Refusing(rag, times=2, error=lambda: GeneratorUnavailableError("every endpoint is ejected"))
    app = Counted(create_app(refusing, RAGConfig()))
    with running(app) as url, Client(url, retries=FAST) as client:
        assert client.query("again").answer
    assert refusing.calls == 3 and len(app.requests) == 3


def test_a_draining_server_is_tried_again_until_it_answers(rag):
    inner = create_app(rag, RAGConfig())
    inner.state.served.state.draining = True  # 503 Draining, Retry-After: 1

    def undrain():
        inner.state.served.state.draining = False

    app = Counted(inner, after_first=undrain)
    with running(app) as url, Client(url, retries=FAST) as client:
        t0 = time.monotonic()
        assert len(client.retrieve("anything")) > 0
        assert time.monotonic() - t0 >= 1.0
    assert app.requests == ["/v1/retrieve"] * 2


def test_retries_stop_at_max_attempts_with_the_typed_error(rag):
    refusing = Refusing(rag, times=1000)
    app = Counted(create_app(refusing, RAGConfig().replace(server={"retry_after_s": 0})))
    with running(app) as url, Client(url, retries=Retries(max_attempts=3, backoff_s=0.01)) as client:
        with pytest.raises(OverloadedError) as caught:
            client.query("never", request_id="bounded-1")
    e = caught.value
    assert (e.status, e.stage, e.error_type) == (429, "admission", "OverloadedError")
    assert (e.attempts, e.request_id) == (3, "bounded-1")
    assert e.retry_after_s == 0.0 and "overloaded" in str(e)
    assert refusing.calls == 3 and len(app.requests) == 3


def test_a_retry_after_beyond_the_deadline_gives_up_at_once(rag):
    refusing = Refusing(rag, times=1000)
    app = Counted(create_app(refusing, RAGConfig().replace(server={"retry_after_s": 30})))
    with running(app) as url, Client(url, retries=Retries(deadline_s=5)) as client:
        with pytest.raises(OverloadedError) as caught:
            client.query("not that long")
    # One request: had it slept into the Retry-After, it would have sent a second.
    assert caught.value.retry_after_s == 30.0 and caught.value.attempts == 1 and len(app.requests) == 1


def test_connection_refused_is_tried_within_the_bound_then_typed():
    with Client(f"http://127.0.0.1:{free_port()}", retries=Retries(max_attempts=3, backoff_s=0.01)) as client:
        with pytest.raises(ServerUnreachableError) as caught:
            client.stats()
    assert caught.value.attempts == 3 and caught.value.status is None
    assert isinstance(caught.value, RemoteError)


def test_a_stream_is_not_tried_again_once_its_events_were_delivered(tmp_path):
    with make_rag(tmp_path, FailingMidStream()) as rag:
        with pytest.raises(GenerationError):
            list(rag.stream("fails in process"))  # the class the client must raise too
        app = Counted(create_app(rag, RAGConfig()))
        with running(app) as url, Client(url, retries=FAST) as client:
            got = []
            with pytest.raises(GenerationError) as caught:
                for event in client.stream("fails over http", request_id="mid-stream-1"):
                    got.append(event)
    assert shape(got)[0] is SourcesEvent  # delivered: from here on, never sent again
    assert len(app.requests) == 1
    assert caught.value.request_id == "mid-stream-1" and "after its first piece" in str(caught.value)


# --- errors ----------------------------------------------------------------------------------


def test_401_without_a_key_or_with_a_wrong_one_is_an_auth_error_never_retried(rag):
    app = Counted(create_app(rag, RAGConfig(), keys=ApiKeys({KEY: "tenant-a"})))
    with running(app) as url:
        for api_key in (None, "not-the-key-0123456789"):
            with Client(url, api_key=api_key, retries=FAST) as client:
                with pytest.raises(AuthError) as caught:
                    client.query("who am I?")
                assert (caught.value.status, caught.value.stage, caught.value.error_type) == (401, "auth",
                                                                                              "Unauthorized")
                assert caught.value.attempts == 1 and caught.value.request_id
                with pytest.raises(AuthError):
                    client.stats()
        assert len(app.requests) == 4
        with Client(url, api_key=KEY) as client:
            assert client.query("who am I?").answer and client.stats()["queries"] == 1


def test_400_and_422_are_the_typed_input_errors_never_retried(url, rag):
    with pytest.raises(EmptyQuestionError) as local:
        rag.query("   ")
    with Client(url, retries=FAST) as client:
        with pytest.raises(EmptyQuestionError) as caught:
            client.query("   ", request_id="empty-1")
        e = caught.value
        assert (e.status, e.stage, e.request_id, e.attempts) == (400, "input", "empty-1", 1)
        assert str(e) == str(local.value)
        for top_k in (0, 101):
            with pytest.raises(InvalidParameterError) as caught:
                client.query("how many?", top_k=top_k)
            assert caught.value.status == 422 and "top_k" in str(caught.value) and caught.value.attempts == 1
            assert isinstance(caught.value, InputError)
        with pytest.raises(EmptyQuestionError):
            list(client.stream(""))
        with pytest.raises(InvalidParameterError):
            client.retrieve("x", top_k=0)


def test_a_504_is_the_deadline_error_and_a_502_the_generation_error_neither_retried(rag):
    for error, cls, status in ((lambda: DeadlineExceededError(0.5), DeadlineExceededError, 504),
                               (lambda: GenerationError("one request failed"), GenerationError, 502)):
        refusing = Refusing(rag, times=1, error=error)
        with running(create_app(refusing, RAGConfig())) as url, Client(url, retries=FAST) as client:
            with pytest.raises(cls) as caught:
                client.query("once")
        assert type(caught.value) is cls and caught.value.status == status and refusing.calls == 1


@pytest.mark.parametrize("error", [
    EmptyQuestionError(), QuestionTooLongError(5000, 4000),
    InvalidParameterError("top_k", 0, "an int in 1..100"),
    OverloadedError(3, 7), DeadlineExceededError(2.0), EngineDeadError("the engine stopped"),
    GeneratorUnavailableError("all ejected"), GenerationError("boom"), IndexNotFoundError("indexes/x"),
])
def test_every_error_the_server_describes_comes_back_as_its_class(error):
    """The server's own mapping (``describe``, ``body``) and the client's, end to end."""
    http = describe(error, "rid-1")
    back = from_body(http.status, orjson.dumps(body(http)), "rid-1")
    assert type(back) is type(error) and str(back) == str(error) and back.stage == error.stage
    assert back.status == http.status and back.request_id == "rid-1"


def test_an_error_rebuilt_from_a_body_pickles_with_its_http_facts():
    http = describe(OverloadedError(3, 7), "rid-2", retry_after_s=2)
    back = pickle.loads(pickle.dumps(from_body(http.status, orjson.dumps(body(http)), "rid-2", 2.0)))
    assert type(back) is OverloadedError
    assert (back.status, back.request_id, back.retry_after_s) == (429, "rid-2", 2.0)


def test_a_body_that_is_not_ragserves_is_a_remote_error_or_the_statuses_class():
    assert type(from_body(502, b"<html>bad gateway</html>", "r")) is RemoteError
    assert type(from_body(429, b"slow down", "r")) is OverloadedError
    def typed(name, stage):
        return orjson.dumps({"error": {"type": name, "message": "no", "stage": stage}})

    assert type(from_body(404, typed("NotFound", "http"), "r")) is RemoteError
    assert type(from_body(400, typed("SomethingNewer", "input"), "r")) is InputError
    assert type(from_body(500, typed("InternalError", "server"), "r")) is RemoteError


# --- the retry policy itself ----------------------------------------------------------------


def test_waits_honour_retry_after_grow_with_attempts_and_jitter_only_adds():
    r = Retries(backoff_s=0.25, max_backoff_s=4.0, jitter=0.2)
    assert r.wait_s(1, None, rng=lambda: 0.0) == 0.25 and r.wait_s(3, None, rng=lambda: 0.0) == 1.0
    assert r.wait_s(10, None, rng=lambda: 0.0) == 4.0
    assert r.wait_s(1, 2.0, rng=lambda: 0.0) == 2.0
    assert r.wait_s(1, 2.0, rng=lambda: 1.0) == pytest.approx(2.4)
    assert r.wait_s(1, 30.0, rng=lambda: 0.0) == 30.0  # a Retry-After beyond max_backoff is honoured
    assert r.next_wait_s(4, None, 0.0) is None  # max_attempts
    assert r.next_wait_s(1, 31.0, 0.0) is None  # past deadline_s
    assert r.next_wait_s(1, None, 0.0) is not None
    with pytest.raises(ValueError, match="max_attempts"):
        Retries(max_attempts=0)


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_s("3") == 3.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", now=lambda: 1445412480.0) == 10.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412490.0) == 0.0


# --- the async client --------------------------------------------------------------------------


async def test_async_client_every_endpoint_with_the_in_process_types(url, rag):
    async with AsyncClient(url) as client:
        r = await client.aquery("async which chunk?", request_id="async-1")
        local = await rag.aquery("async which chunk?")
        assert isinstance(r, QueryResult) and r.request_id == "async-1" and r.answer == local.answer
        same_sources(r.sources, local.sources)
        remote = [e async for e in client.astream("async stream", cache_read=False, cache_write=False)]
        mine = [e async for e in rag.astream("async stream", cache_read=False, cache_write=False)]
        assert shape(remote) == shape(mine) == [SourcesEvent, TokenEvent, DoneEvent]
        assert remote[-1].result.answer == mine[-1].result.answer
        same_sources(await client.aretrieve("anything", top_k=2), await rag.aretrieve("anything", 2))
        assert (await client.astats())["queries"] >= 2


async def test_async_client_retries_a_429_and_maps_401_and_400(rag):
    refusing = Refusing(rag, times=1)
    app = Counted(create_app(refusing, RAGConfig().replace(server={"retry_after_s": 1}),
                             keys=ApiKeys({KEY: "tenant-a"})))
    with running(app) as url:
        async with AsyncClient(url, api_key=KEY, retries=FAST) as client:
            t0 = time.monotonic()
            assert (await client.aquery("async patience")).answer
            assert time.monotonic() - t0 >= 1.0 and refusing.calls == 2
            with pytest.raises(EmptyQuestionError) as caught:
                await client.aquery("")
            assert caught.value.status == 400
            with pytest.raises(InvalidParameterError):
                [e async for e in client.astream("x", top_k=0)]
        async with AsyncClient(url, api_key="wrong-key-0123456789abc") as client:
            with pytest.raises(AuthError) as caught:
                await client.aretrieve("x")
            assert caught.value.status == 401 and caught.value.attempts == 1


async def test_async_client_gives_up_at_max_attempts(rag):
    refusing = Refusing(rag, times=1000)
    with running(create_app(refusing, RAGConfig().replace(server={"retry_after_s": 0}))) as url:
        async with AsyncClient(url, retries=Retries(max_attempts=2, backoff_s=0.01)) as client:
            with pytest.raises(OverloadedError) as caught:
                await asyncio.wait_for(client.aquery("never"), 60)
    assert caught.value.attempts == 2 and refusing.calls == 2


def test_the_raw_server_answer_and_the_client_agree(url):
    """The client reads exactly what the server sent (no field lost on the way)."""
    raw = post(f"{url}/v1/query", json={"question": "raw"}).json()
    with Client(url) as client:
        r = client.query("raw")
    assert r.to_dict()["sources"] == raw["sources"] and r.answer == raw["answer"]
    assert r.usage.total_tokens == raw["usage"]["total_tokens"] and r.model == raw["model"]


def test_a_client_loads_none_of_the_engines_or_servers_dependencies():
    code = ("import sys; from ragserve import AsyncClient, Client; Client('http://127.0.0.1:1'); "
            "AsyncClient('http://127.0.0.1:1'); print(sorted(m for m in ('torch', 'faiss', 'vllm', "
            "'sentence_transformers', 'fastapi', 'uvicorn') if m in sys.modules), 'httpx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True"]
