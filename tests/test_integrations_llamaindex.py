"""``ragserve.integrations.llamaindex``: ragserve's retriever inside LlamaIndex's own
``RetrieverQueryEngine``, and ragserve's whole pipeline as a query engine, backed by an
in-process ``RAG`` (fakes) or by the HTTP clients against a real server on loopback; then
the same over a real XQuAD index (retrieval) and the session's real engine (answers)."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core", reason="llama-index-core is in the CPU lock; run `make setup`")

from llama_index.core import PromptTemplate  # noqa: E402
from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402

from ragserve import AsyncClient, Client, EmptyQuestionError, IntegrationError, RAGConfig  # noqa: E402
from ragserve.integrations.llamaindex import RagserveQueryEngine, RagserveRetriever  # noqa: E402
from ragserve.server.app import create_app  # noqa: E402
from ragserve.testing.fakes import FakeGenerator, fake_rag  # noqa: E402
from ragserve.testing.http import running  # noqa: E402

QUESTION = "chunk number 3"
QA = PromptTemplate("Context:\n{context_str}\nQuestion: {query_str}\nAnswer:")


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A ``RAG`` on fakes (not conftest's ``rag``, the session's real engine)."""
    with fake_rag(tmp_path_factory.mktemp("li"), FakeGenerator(words=3)) as r:
        yield r


@pytest.fixture(scope="module")
def url(fake):
    with running(create_app(fake, RAGConfig())) as base:
        yield base


def facts(nodes):
    """What a node says about its source: id, document, chunk, score, text."""
    assert all(isinstance(n, NodeWithScore) and isinstance(n.node, TextNode) for n in nodes)
    return [(n.node.node_id, n.node.ref_doc_id, n.node.metadata["chunk_id"], round(n.score, 4), n.node.text)
            for n in nodes]


def expected(sources):
    return [(f"{s.doc_id}#{s.chunk_id}", s.doc_id, s.chunk_id, round(s.score, 4), s.text) for s in sources]


def test_the_retriever_returns_ragserves_sources_as_nodes_with_scores(fake):
    nodes = RagserveRetriever(fake, top_k=3).retrieve(QUESTION)
    assert facts(nodes) == expected(fake.retrieve(QUESTION, 3))
    assert len(nodes) == 3 and nodes[0].score == pytest.approx(1.0)
    assert nodes[0].node.metadata["doc_id"] == nodes[0].node.ref_doc_id
    # The LLM reads the document's name, not ragserve's numbers.
    assert "doc_id" in nodes[0].node.get_content("llm") and "score" not in nodes[0].node.get_content("llm")


async def test_aretrieve_gives_the_same_nodes(fake):
    nodes = await RagserveRetriever(fake, top_k=2).aretrieve(QUESTION)
    assert facts(nodes) == expected(fake.retrieve(QUESTION, 2))


def test_over_http_the_clients_give_what_the_in_process_rag_gives(fake, url):
    with Client(url) as client:
        nodes = RagserveRetriever(client, top_k=4).retrieve(QUESTION)
    assert facts(nodes) == expected(fake.retrieve(QUESTION, 4))


async def test_over_http_the_async_client_and_the_blocking_one_in_a_thread(fake, url):
    want = expected(fake.retrieve(QUESTION, 2))
    async with AsyncClient(url) as aclient:
        assert facts(await RagserveRetriever(aclient, top_k=2).aretrieve(QUESTION)) == want
        with pytest.raises(IntegrationError, match="only async verbs"):
            RagserveRetriever(aclient).retrieve(QUESTION)
    with Client(url) as client:
        assert facts(await RagserveRetriever(client, top_k=2).aretrieve(QUESTION)) == want


def test_a_real_retriever_query_engine_answers_from_ragserves_sources(fake, url):
    """LlamaIndex's own engine, with its own synthesizer and LLM (MockLLM echoes its prompt):
    the nodes it cites are ragserve's, and their text reached the LLM's prompt."""
    with Client(url) as client:
        engine = RetrieverQueryEngine.from_args(RagserveRetriever(client, top_k=2), llm=MockLLM(),
                                                text_qa_template=QA)
        response = engine.query(QUESTION)
    assert facts(response.source_nodes) == expected(fake.retrieve(QUESTION, 2))
    for source in fake.retrieve(QUESTION, 2):
        assert source.text in str(response)
    assert f"Question: {QUESTION}" in str(response)


def test_the_query_engine_is_ragserves_pipeline(fake, url):
    local = fake.query("a question for the engine", top_k=2)
    with Client(url) as client:
        engine = RagserveQueryEngine(client, top_k=2)
        response = engine.query("a question for the engine")
        assert facts(engine.retrieve(QueryBundle(QUESTION))) == expected(fake.retrieve(QUESTION, 2))
    assert response.response == local.answer == "an answer more"
    assert facts(response.source_nodes) == expected(local.sources)
    assert response.metadata["cache_tier"] == "l1" and response.metadata["model"] == "fake-llm"
    assert response.metadata["timings_ms"]["total"] > 0


async def test_the_query_engine_async_and_its_options(fake, url):
    async with AsyncClient(url) as aclient:
        engine = RagserveQueryEngine(aclient, top_k=2, cache_read=False, cache_write=False)
        response = await engine.aquery("uncached, twice")
        again = await engine.aquery("uncached, twice")
    assert response.metadata["cache_tier"] == again.metadata["cache_tier"] == "miss"
    assert response.response == "an answer more"
    assert len(response.source_nodes) >= 1
    with pytest.raises(IntegrationError, match="blocking 'retrieve'"):
        engine.retrieve(QueryBundle("uncached, twice"))


def test_typed_errors_come_through(fake, url):
    with pytest.raises(IntegrationError, match="cannot answer from a str"):
        RagserveRetriever("http://localhost:8000")
    with Client(url) as client, pytest.raises(EmptyQuestionError):
        RagserveQueryEngine(client).query("   ")


def gold(xquad_corpus):
    """The first XQuAD question of the corpus, with the file of its paragraph."""
    return xquad_corpus[1][0]


@pytest.mark.integration
def test_over_a_real_xquad_index_the_engine_cites_the_gold_paragraph(xquad_index, xquad_corpus, embedder):
    """The real MiniLM model and FAISS index (no generation): an XQuAD question through
    LlamaIndex's ``RetrieverQueryEngine`` cites the paragraph that holds its answer."""
    from ragserve import RAG

    qa = gold(xquad_corpus)
    with RAG.from_index(xquad_index, start_engine=False, embedder=embedder) as rag:
        engine = RetrieverQueryEngine.from_args(RagserveRetriever(rag, top_k=3), llm=MockLLM(),
                                                text_qa_template=QA)
        response = engine.query(qa["question"])
        assert facts(response.source_nodes) == expected(rag.retrieve(qa["question"], 3))
    [cited] = [n.node for n in response.source_nodes if n.node.ref_doc_id == qa["doc_id"]]
    assert any(answer in cited.text for answer in qa["answers"])


@pytest.mark.engine
def test_the_query_engine_over_the_real_engine_answers_an_xquad_question(rag, xquad_corpus):
    """The session's real engine (conftest's ``rag``): ragserve's answer and its sources.
    The question is the first whose paragraph ragserve retrieves first (this checks the
    adapter, not retrieval: the answer's prompt keeps only sources near the best one)."""
    qa = next(q for q in xquad_corpus[1] if rag.retrieve(q["question"], 1)[0].doc_id == q["doc_id"])
    response = RagserveQueryEngine(rag).query(qa["question"])
    result = rag.query(qa["question"])  # the same key: the answer above, from L1
    assert result.cache_tier == "l1" and response.metadata["model"] == result.model != "fake-llm"
    assert response.response == result.answer and response.response.strip()
    assert facts(response.source_nodes) == expected(result.sources)
    assert response.source_nodes[0].node.ref_doc_id == qa["doc_id"]
