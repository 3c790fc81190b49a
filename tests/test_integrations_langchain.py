"""``ragserve.integrations.langchain``: LangChain's own standard retriever tests
(``langchain-tests``) on ragserve's retriever, in process and over HTTP; the answering
``Runnable`` (invoke, ainvoke, batch, stream, astream) backed by a ``RAG``, a ``Client`` and
an ``AsyncClient`` against a real server on loopback, with fakes behind it.

langchain-core is in the lock; langchain-tests lives in the overlay (``$BENCH_PEER``,
default build/bench-peer; requirements/langchain-tests.txt says why), appended to
``sys.path`` as tests/test_bench_langchain.py does: the venv's own packages always win.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

OVERLAY = Path(os.environ.get("BENCH_PEER", Path(__file__).resolve().parent.parent / "build" / "bench-peer"))
if OVERLAY.is_dir() and str(OVERLAY) not in sys.path:
    sys.path.append(str(OVERLAY))

pytest.importorskip("langchain_core", reason="langchain-core is in the CPU lock; run `make setup`")
standard = pytest.importorskip("langchain_tests.integration_tests",
                               reason="langchain-tests lives in the overlay: make test (or make bench-deps)")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.runnables import RunnableLambda  # noqa: E402

from ragserve import (  # noqa: E402
    AsyncClient,
    Client,
    EmptyQuestionError,
    IntegrationError,
    InvalidParameterError,
    RAGConfig,
    RemoteError,
)
from ragserve.integrations.langchain import RagserveAnswer, RagserveRetriever  # noqa: E402
from ragserve.server.app import create_app  # noqa: E402
from ragserve.testing.fakes import FakeGenerator, fake_rag  # noqa: E402
from ragserve.testing.http import running  # noqa: E402

QUESTION = "chunk number 3"


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A ``RAG`` on fakes (8 one-chunk documents) that fails prompts with "poison"."""
    with fake_rag(tmp_path_factory.mktemp("lc"), FakeGenerator(words=3, fail_on="poison")) as r:
        yield r


@pytest.fixture(scope="module")
def url(fake):
    with running(create_app(fake, RAGConfig())) as base:
        yield base


# --- LangChain's own standard tests -----------------------------------------------------------


class TestStandardInProcess(standard.RetrieversIntegrationTests):
    """The retriever over an in-process ``RAG``."""

    @pytest.fixture(autouse=True)
    def _source(self, fake):
        self.source = fake

    @property
    def retriever_constructor(self):
        return RagserveRetriever

    @property
    def retriever_constructor_params(self):
        return {"source": self.source}

    @property
    def retriever_query_example(self):
        return QUESTION


class TestStandardOverHttp(TestStandardInProcess):
    """The retriever over a ``Client`` to a real server (its async half in a thread)."""

    @pytest.fixture(autouse=True)
    def _source(self, url):
        with Client(url) as client:
            self.source = client
            yield


# --- the retriever, beyond the standard --------------------------------------------------------


def as_tuples(docs):
    assert all(isinstance(d, Document) for d in docs)
    return [(d.id, d.metadata["doc_id"], d.metadata["chunk_id"], round(d.metadata["score"], 4),
             d.page_content) for d in docs]


def expected(sources):
    return [(f"{s.doc_id}#{s.chunk_id}", s.doc_id, s.chunk_id, round(s.score, 4), s.text) for s in sources]


async def test_the_retriever_returns_ragserves_sources_best_first(fake, url):
    want = expected(fake.retrieve(QUESTION, 3))
    assert as_tuples(RagserveRetriever(source=fake, k=3).invoke(QUESTION)) == want
    async with AsyncClient(url) as aclient:
        assert as_tuples(await RagserveRetriever(source=aclient, k=3).ainvoke(QUESTION)) == want
        with pytest.raises(IntegrationError, match="only async verbs"):
            RagserveRetriever(source=aclient).invoke(QUESTION)
    assert want[0][3] == 1.0 and [t[3] for t in want] == sorted((t[3] for t in want), reverse=True)


def test_a_source_it_cannot_use_is_refused_at_construction():
    with pytest.raises(IntegrationError, match="cannot answer from a str"):
        RagserveRetriever(source="http://localhost:8000")
    with pytest.raises(IntegrationError):
        RagserveAnswer(source=object())


# --- the answering Runnable --------------------------------------------------------------------


def without_run(out):
    """An output without what differs between two runs of one question (id, timings)."""
    return {k: v for k, v in out.items() if k not in ("request_id", "timings_ms", "cache_tier")}


def summed(pieces):
    total = pieces[0]
    for piece in pieces[1:]:
        total = total + piece
    return total


def test_invoke_answers_with_the_sources_in_process_and_over_http(fake, url):
    local = fake.query("what is in chunk 5?")
    out = RagserveAnswer(source=fake).invoke("what is in chunk 5?")
    assert out["answer"] == local.answer == "an answer more" and out["cache_tier"] == "l1"
    assert as_tuples(out["context"]) == expected(local.sources) and out["input"] == "what is in chunk 5?"
    assert out["model"] == "fake-llm" and out["timings_ms"]["total"] > 0
    with Client(url) as client:
        remote = RagserveAnswer(source=client).invoke({"question": "what is in chunk 5?"})
    assert without_run(remote) == without_run(out)


async def test_ainvoke_with_the_async_client_and_the_blocking_one(fake, url):
    want = without_run(RagserveAnswer(source=fake).invoke({"input": "asynchronous?"}))
    async with AsyncClient(url) as aclient:
        assert without_run(await RagserveAnswer(source=aclient).ainvoke("asynchronous?")) == want
        with pytest.raises(IntegrationError):
            RagserveAnswer(source=aclient).invoke("asynchronous?")
    with Client(url) as client:
        assert without_run(await RagserveAnswer(source=client).ainvoke({"query": "asynchronous?"})) == want


def test_stream_gives_the_sources_then_the_answer_and_adds_up_to_invoke(fake, url):
    uncached = {"cache_read": False, "cache_write": False}
    with Client(url) as client:
        pieces = list(RagserveAnswer(source=client, options=uncached).stream("stream this"))
    assert list(pieces[0]) == ["input"] and "context" in pieces[1] and pieces[1]["cache_tier"] == "miss"
    # as generated; over HTTP the server sends pieces that arrived together as one (a loaded
    # machine joins " answer" and " more"), so the split varies but never the text
    tokens = [p["answer"] for p in pieces[2:-1]]
    assert tokens and all(tokens) and "".join(tokens) == "an answer more"
    whole = RagserveAnswer(source=fake, options=uncached).invoke("stream this")
    assert without_run(summed(pieces)) == without_run(whole)
    assert summed(pieces)["cache_tier"] == "miss"


async def test_astream_with_each_source(fake, url):
    uncached = {"cache_read": False, "cache_write": False}
    want = without_run(RagserveAnswer(source=fake, options=uncached).invoke("a stream"))
    async with AsyncClient(url) as aclient:
        streamed = [p async for p in RagserveAnswer(source=aclient, options=uncached).astream("a stream")]
    assert len(streamed) >= 4 and without_run(summed(streamed)) == want
    in_process = [p async for p in RagserveAnswer(source=fake, options=uncached).astream("a stream")]
    assert without_run(summed(in_process)) == want
    with Client(url) as client:  # blocking-only: the whole answer in one piece, from a thread
        whole = [p async for p in RagserveAnswer(source=client, options=uncached).astream("a stream")]
    assert len(whole) == 2 and without_run(summed(whole)) == want


def test_in_a_chain_with_callbacks_one_failure_stays_in_its_slot(fake, url):
    class Runs(BaseCallbackHandler):
        def __init__(self):
            self.started, self.errors = 0, 0

        def on_chain_start(self, *args, **kwargs):
            self.started += 1

        def on_chain_error(self, *args, **kwargs):
            self.errors += 1

    runs = Runs()
    with Client(url) as client:
        chain = RunnableLambda(lambda q: {"question": q.strip()}) | RagserveAnswer(source=client)
        outs = chain.batch(["  fine one ", "poison pill", "fine two"], config={"callbacks": [runs]},
                           return_exceptions=True)
        with pytest.raises(EmptyQuestionError):
            RagserveAnswer(source=client).invoke("   ")
    assert outs[0]["answer"] == outs[2]["answer"] == "an answer more"
    # The fake fails with a bare RuntimeError: the server's 500, as the client's typed error.
    assert isinstance(outs[1], RemoteError) and outs[1].status == 500
    assert runs.errors >= 1 and runs.started >= 3


def test_an_input_without_a_question_is_refused_by_name(fake):
    with pytest.raises(InvalidParameterError, match="'input', 'question' or 'query'"):
        RagserveAnswer(source=fake).invoke({"text": "where is the question?"})
