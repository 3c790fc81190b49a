"""The pipeline's logic with small fakes for the models (the real ones: test_engine.py)."""

import asyncio

import numpy as np
import pytest

from ragserve.config import RAGConfig
from ragserve.docstore import LazyDocStore, write_docstore
from ragserve.errors import EmptyQuestionError, QuestionTooLongError
from ragserve.index import FaissIndex
from ragserve.manifest import Manifest
from ragserve.rag import RAG
from ragserve.types import Chunk, Generation, TokenUsage

from .test_prompt import WordTokenizer

DIM = 8


class FakeEmbedder:
    dim = DIM
    identity = {"name": "fake", "identity": "fake"}

    def __init__(self):
        self.calls = 0

    def warm_up(self):
        pass

    def encode(self, texts, *, batch_size=None):
        self.calls += 1
        out = np.zeros((len(texts), DIM), np.float32)
        for i, t in enumerate(texts):
            out[i, sum(map(ord, t)) % DIM] = 1.0  # the chunk whose id matches the hash wins
        return out


class FakeGenerator:
    model_name = "fake-llm"

    def __init__(self, fail_on=None, delay=0.01, words=2):
        self.prompts = []
        self.request_ids = []
        self.fail_on = fail_on
        self.delay = delay
        self.words = words
        self.running = 0

    def warm_up(self):
        pass

    def tokenizer(self):
        return WordTokenizer()

    async def generate(self, prompt, request_id, token_ids=None):
        gen = None
        async for piece in self.stream(prompt, request_id):
            gen = piece
        return gen

    async def stream(self, prompt, request_id, token_ids=None, deltas=True):
        """Like vLLM: ``words`` pieces ``delay`` seconds apart, then the ``Generation``
        (the pieces too when ``deltas`` is off: the pipeline must cope with either)."""
        self.prompts.append(prompt)
        self.request_ids.append(request_id)
        self.running += 1
        try:
            pieces = (["an", " answer"] + [" more"] * self.words)[: self.words]
            for piece in pieces:
                await asyncio.sleep(self.delay / len(pieces))
                if self.fail_on and self.fail_on in prompt:
                    raise RuntimeError("boom")
                yield piece
            yield Generation("".join(pieces), TokenUsage(len(prompt.split()), len(pieces)), "stop", 1.0, 2.0, 3.0)
        finally:
            self.running -= 1

    def unfinished(self):
        return self.running

    def shutdown(self):
        pass


def _make_rag(tmp_path, cfg):
    chunks = [Chunk(i, f"doc{i}.txt", f"chunk number {i}") for i in range(DIM)]
    write_docstore(tmp_path, chunks)
    index = FaissIndex.build(np.eye(DIM, dtype=np.float32), "flat-fp16")
    manifest = Manifest(tmp_path, {"fingerprint": "f" * 64, "embedding": {"dim": DIM}})
    return RAG(manifest, index, LazyDocStore(tmp_path), FakeEmbedder(), FakeGenerator(fail_on="poison"), cfg)


@pytest.fixture
def fake_rag(tmp_path):
    # One-hot vectors: every source but the best scores 0, far below it; keep them all here.
    with _make_rag(tmp_path, RAGConfig().replace(prompt={"max_score_gap": 0})) as rag:
        yield rag


def test_sources_far_below_the_best_are_left_out_of_the_prompt_and_the_result(tmp_path):
    with _make_rag(tmp_path, RAGConfig()) as rag:
        r = rag.query("which chunk?")
        assert [s.score for s in r.sources] == [1.0] and r.dropped_sources == 0
        assert rag.generator.prompts[-1].count("chunk number") == 1


def test_query_result_shape_and_timings(fake_rag):
    r = fake_rag.query("  which chunk?  ")
    assert str(r) == "an answer" and r.question == "which chunk?"
    assert r.cache_tier == "miss" and r.model == "fake-llm" and r.index_fingerprint == "f" * 64
    assert len(r.sources) == 3 and r.sources[0].score >= r.sources[1].score
    t = r.timings
    assert (t.generate_queue, t.generate_first_token, t.generate_decode) == (1.0, 2.0, 3.0)
    parts = t.embed_wait + t.embed + t.search + t.docload + t.prompt + t.generate
    assert 0 < parts <= t.total
    assert r.to_dict()["usage"]["total_tokens"] == r.usage.total_tokens
    assert fake_rag.stats()["stages"]["total"]["count"] == 1


@pytest.mark.parametrize("bad", ["", "   \n\t"])
def test_empty_question_refused_before_any_work(fake_rag, bad):
    with pytest.raises(EmptyQuestionError):
        fake_rag.query(bad)
    assert fake_rag.embedder.calls == 0 and fake_rag.generator.prompts == []


def test_too_long_question_refused_before_any_work(fake_rag):
    with pytest.raises(QuestionTooLongError, match="2001 characters"):
        fake_rag.query("x" * 2001)
    assert fake_rag.embedder.calls == 0


async def test_aquery_and_query_from_inside_a_running_loop(fake_rag):
    r = await fake_rag.aquery("async?")
    assert r.answer == "an answer"
    # A notebook calls the sync API while its own loop runs: it must not deadlock.
    assert fake_rag.query("sync inside loop?").answer == "an answer"


def test_query_from_many_threads(fake_rag):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fake_rag.query, [f"q{i}" for i in range(16)]))
    assert [r.question for r in results] == [f"q{i}" for i in range(16)]


def test_batch_keeps_order_and_failures_stay_in_their_slot(fake_rag):
    out = fake_rag.query_batch(["first", "poison pill", "", "last"])
    assert out[0].question == "first" and out[3].question == "last"
    assert isinstance(out[1], RuntimeError)
    assert isinstance(out[2], EmptyQuestionError)
    assert fake_rag.stats()["errors"] == 2


def test_retrieve_needs_no_generator(fake_rag):
    sources = fake_rag.retrieve("anything", top_k=20)
    assert len(sources) == DIM  # k above the corpus size is clamped, never -1 ids
    assert fake_rag.generator.prompts == []


def test_close_is_idempotent(fake_rag):
    fake_rag.close()
    fake_rag.close()
