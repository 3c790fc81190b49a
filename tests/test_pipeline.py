"""The pipeline's logic with small fakes for the models (the real ones: test_engine.py)."""


import pytest

from ragserve.config import RAGConfig
from ragserve.errors import EmptyQuestionError, QuestionTooLongError
from ragserve.testing.fakes import DIM, FakeGenerator
from ragserve.testing.fakes import fake_rag as make_fake_rag


def test_sources_far_below_the_best_are_left_out_of_the_prompt_and_the_result(tmp_path):
    with make_fake_rag(tmp_path, FakeGenerator(fail_on="poison"), config=RAGConfig()) as rag:
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
