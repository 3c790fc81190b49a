"""One bad input never hurts anyone else: shared micro-batches, a shared FAISS search and
single-flight runs fail only the request that caused the failure."""

import asyncio
import math

import numpy as np
import pytest

from ragserve.config import RAGConfig
from ragserve.errors import InvalidTextError
from ragserve.index.manifest import Manifest
from ragserve.rag import RAG
from ragserve.retrieval.docstore import LazyDocStore, write_docstore
from ragserve.retrieval.embed import MicroBatcher
from ragserve.retrieval.faiss_index import FaissIndex
from ragserve.testing.fakes import DIM, FakeEmbedder, FakeGenerator
from ragserve.types import Chunk

BOMB = "tokenizer-bomb"


class PickyEmbedder(FakeEmbedder):
    """Fails a whole call when one text holds BOMB, as the real tokenizer does for a lone
    surrogate (``TypeError: TextEncodeInput must be ...``)."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def encode(self, texts, *, batch_size=None):
        self.batches.append(list(texts))
        if any(BOMB in t for t in texts):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return super().encode(texts)


class PickyIndex:
    """A real FAISS index whose batched search fails when one query is the poison vector."""

    def __init__(self, index, poison_row):
        self.index, self.poison = index, poison_row
        self.dim, self.ntotal = index.dim, index.ntotal

    def search(self, vectors, k):
        if any(np.array_equal(v, self.poison) for v in vectors):
            raise RuntimeError("Error in faiss::IndexScalarQuantizer::search: poisoned query")
        return self.index.search(vectors, k)


def picky_rag(tmp_path, index_wrapper=None, **sections):
    chunks = [Chunk(i, f"doc{i}.txt", f"chunk number {i}") for i in range(DIM)]
    write_docstore(tmp_path, chunks)
    index = FaissIndex.build(np.eye(DIM, dtype=np.float32), "flat-fp16")
    if index_wrapper:
        index = index_wrapper(index)
    manifest = Manifest(tmp_path, {"fingerprint": "f" * 64, "embedding": {"dim": DIM}})
    config = RAGConfig().replace(embed={"batch_window_ms": 50}, **sections)
    return RAG(manifest, index, LazyDocStore(tmp_path), PickyEmbedder(), FakeGenerator(), config)


# -- the micro-batcher -------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "bad"), [(3, [1]), (64, [17]), (64, [0, 63]), (5, [0, 1, 2, 3, 4])])
async def test_a_failing_batch_fails_only_the_items_that_fail_alone(n, bad):
    calls = []

    def fn(items):
        calls.append(list(items))
        if any(i in bad for i in items):
            raise ValueError(f"cannot take {sorted(set(items) & set(bad))}")
        return [i * 10 for i in items]

    b = MicroBatcher(fn, None, window_s=0.05, max_batch=64)
    out = await asyncio.gather(*(b.submit(i) for i in range(n)), return_exceptions=True)
    for i, r in enumerate(out):
        if i in bad:
            assert isinstance(r, ValueError) and str(r) == f"cannot take [{i}]"  # its own error
        else:
            assert r[0] == i * 10
    assert calls[0] == list(range(n))  # they did share one batch first
    if len(bad) == 1:  # bisection: about 2·log2(n) retries, not one call per item
        assert len(calls) <= 1 + 2 * math.ceil(math.log2(n))
    assert (await b.submit(7))[0] == 70  # and the batcher goes on serving


async def test_a_wrong_result_count_fails_the_batch_and_each_item_is_asked_alone():
    def fn(items):
        return [0] if len(items) > 1 else [items[0] + 1]

    b = MicroBatcher(fn, None, window_s=0.05, max_batch=64)
    out = await asyncio.gather(*(b.submit(i) for i in range(4)))
    assert [r for r, _ in out] == [1, 2, 3, 4]


class Interrupt(BaseException):
    """Stands in for KeyboardInterrupt, which asyncio would re-raise out of the test's loop."""


async def test_an_interrupt_in_the_batch_function_is_not_retried():
    calls = []

    def fn(items):
        calls.append(items)
        raise Interrupt

    b = MicroBatcher(fn, None, window_s=0.05, max_batch=64)
    out = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
    assert all(isinstance(r, Interrupt) for r in out) and len(calls) == 1


# -- the pipeline: shared embedding batch, shared FAISS search ---------------------------------


def test_concurrent_aretrieve_one_bad_question_fails_alone(tmp_path):
    rag = picky_rag(tmp_path)
    try:
        async def three():
            return await asyncio.gather(rag.aretrieve("What was the Apollo program?"),
                                        rag.aretrieve(f"What was the {BOMB} program?"),
                                        rag.aretrieve("Who ran the Apollo program?"), return_exceptions=True)

        good, bad, also_good = asyncio.run(three())
        assert isinstance(bad, TypeError)
        assert len(good) == 3 and len(also_good) == 3
        assert len(rag.embedder.batches[0]) == 3  # the three shared one model call
    finally:
        rag.close()


def test_query_batch_without_the_cache_one_bad_question_fails_alone(tmp_path):
    rag = picky_rag(tmp_path, cache={"enabled": False})
    try:
        out = rag.query_batch(["What was the Apollo program?", f"{BOMB}?", "Who ran it?"])
        assert out[0].answer == "an answer" and out[2].answer == "an answer"
        assert isinstance(out[1], TypeError)
    finally:
        rag.close()


def test_a_failing_shared_faiss_search_fails_only_its_own_query(tmp_path):
    poison = FakeEmbedder().encode(["the poisoned question"])[0]
    rag = picky_rag(tmp_path, index_wrapper=lambda index: PickyIndex(index, poison))
    try:
        async def three():
            # "q3" and "q2" land on other rows than the poisoned question (see FakeEmbedder)
            return await asyncio.gather(rag.aretrieve("q3"), rag.aretrieve("the poisoned question"),
                                        rag.aretrieve("q2"), return_exceptions=True)

        first, bad, last = asyncio.run(three())
        assert isinstance(bad, RuntimeError) and "poisoned" in str(bad)
        assert first and last and not isinstance(first, Exception) and not isinstance(last, Exception)
    finally:
        rag.close()


# -- single-flight ------------------------------------------------------------------------------


# Single-flight's own isolation (a cancelled leader, a run being cancelled): tests/test_flight.py.


def test_real_tokenizer_failure_in_a_shared_batch_stays_with_its_question(xquad_index, embedder):
    from ragserve.observe.timing import StageClock

    with RAG.from_index(xquad_index, start_engine=False, embedder=embedder) as rag:
        async def through_the_retriever():  # below validation: the batch itself must isolate
            r = rag.retriever
            return await asyncio.gather(*(r.retrieve(q, 3, StageClock()) for q in (
                "What was the Apollo program?", "What was the \ud800 Apollo program?", "Who founded Warsaw?")),
                return_exceptions=True)

        good, bad, also_good = rag.call(through_the_retriever())
        assert isinstance(bad, TypeError)
        assert len(good) == 3 and len(also_good) == 3 and rag.retriever.batcher.batches >= 1

        async def through_the_api():  # the example: the bad question is refused first
            return await asyncio.gather(rag.aretrieve("What was the Apollo program?"),
                                        rag.aretrieve("What was the \ud800 Apollo program?"),
                                        rag.aretrieve("Who founded Warsaw?"), return_exceptions=True)

        good, bad, also_good = asyncio.run(through_the_api())
        assert isinstance(bad, InvalidTextError)
        assert len(good) == 3 and len(also_good) == 3
