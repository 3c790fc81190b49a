import pytest

from ragserve.config import RAGConfig
from ragserve.config.prompt import PROMPT_TEMPLATE_VERSION, PromptConfig
from ragserve.errors import QuestionTooLongError
from ragserve.generators.prompt import PromptBuilder, select_sources
from ragserve.testing.fakes import WordTokenizer
from ragserve.types import Source

ALL = PromptConfig(max_score_gap=0)  # every retrieved source is a candidate


def _sources(n, words=50, step=0.01):
    return [Source(f"d{i}", i, 1.0 - i * step, " ".join([f"w{i}"] * words)) for i in range(n)]


def test_everything_fits():
    p = PromptBuilder(WordTokenizer(), 2048, 64).build("what is w1?", _sources(3))
    assert p.dropped == 0 and len(p.used) == 3
    assert p.text.index("w0 w0") < p.text.index("w1 w1") < p.text.index("w2 w2")
    assert p.text.index("Question: what is w1?") > p.text.index("w2 w2")  # the question last
    assert p.tokens + 64 <= 2048


def test_lowest_ranked_are_dropped_to_fit():
    builder = PromptBuilder(WordTokenizer(), 260, 64, ALL)  # room for about three 50-word sources
    p = builder.build("what?", _sources(6))
    assert 0 < len(p.used) < 6
    assert [s.chunk_id for s in p.used] == list(range(len(p.used)))  # best first, kept in rank order
    assert p.dropped == 6 - len(p.used)
    assert p.tokens <= 260 - 64


def test_best_source_alone_too_long_is_cut_not_dropped():
    p = PromptBuilder(WordTokenizer(), 200, 64, ALL).build("what?", _sources(2, words=500))
    assert len(p.used) == 1 and p.used[0].metadata["truncated"] is True
    assert p.dropped == 1
    assert p.tokens <= 200 - 64


def test_question_that_cannot_fit_is_refused():
    with pytest.raises(QuestionTooLongError, match="prompt tokens"):
        PromptBuilder(WordTokenizer(), 100, 64).build("word " * 200, _sources(1))


def test_sources_far_below_the_best_are_left_out():
    sources = [Source("a", 7, 0.80, "alpha"), Source("b", 3, 0.77, "beta"), Source("c", 1, 0.70, "gamma")]
    assert [s.doc_id for s in select_sources(sources, 0.05)] == ["a", "b"]
    assert [s.doc_id for s in select_sources(sources, 0)] == ["a", "b", "c"]  # 0: no cut
    p = PromptBuilder(WordTokenizer(), 2048, 64, PromptConfig(max_score_gap=0.05)).build("q?", sources)
    assert [s.doc_id for s in p.used] == ["a", "b"] and "gamma" not in p.text
    assert p.dropped == 0  # "dropped" counts what the budget cut, not what was not worth showing


def test_a_text_retrieved_twice_appears_once_in_the_prompt_and_the_sources():
    same = "Use try/except to handle errors.\n\nThe finally clause\n------------------\nruns last."
    markup = same.replace("-" * 18, "=" * 18)  # the same words, another heading underline
    sources = [Source("try.txt", 4, 0.9, same), Source("compound.txt", 9, 0.89, f"  {markup}\n"),
               Source("other.txt", 2, 0.88, "Something else.")]
    p = PromptBuilder(WordTokenizer(), 2048, 64).build("how?", sources)
    assert [s.doc_id for s in p.used] == ["try.txt", "other.txt"]  # the better-scored copy stays
    assert p.text.count("handle errors.") == 1


def test_chunk_id_order_lays_out_by_index_order_and_budget_still_drops_the_weakest():
    sources = [Source("x", 9, 0.90, "nine " * 50), Source("y", 2, 0.89, "two " * 50),
               Source("z", 5, 0.88, "five " * 50)]
    cfg = PromptConfig(max_score_gap=0, order="chunk_id")
    p = PromptBuilder(WordTokenizer(), 2048, 64, cfg).build("q?", sources)
    assert [s.chunk_id for s in p.used] == [2, 5, 9]
    assert p.text.index("two") < p.text.index("five") < p.text.index("nine") < p.text.index("Question")
    tight = PromptBuilder(WordTokenizer(), 190, 64, cfg).build("q?", sources)  # room for two
    assert [s.chunk_id for s in tight.used] == [2, 9] and tight.dropped == 1  # chunk 5 scored lowest


def test_two_questions_over_the_same_chunks_share_the_prefix_up_to_the_question():
    cfg = PromptConfig(max_score_gap=0, order="chunk_id")
    a = [Source("x", 9, 0.9, "nine"), Source("y", 2, 0.8, "two")]
    b = [Source("y", 2, 0.95, "two"), Source("x", 9, 0.7, "nine")]  # same chunks, other scores
    builder = PromptBuilder(WordTokenizer(), 2048, 64, cfg)
    pa, pb = builder.build("first question?", a), builder.build("second one?", b)
    assert pa.text.split("Question:")[0] == pb.text.split("Question:")[0]
    by_score = PromptBuilder(WordTokenizer(), 2048, 64, PromptConfig(max_score_gap=0))
    assert by_score.build("q", a).text.split("Question:")[0] != by_score.build("q", b).text.split("Question:")[0]


def test_the_prompt_layout_and_template_version_are_part_of_every_answer_key(monkeypatch):
    base = RAGConfig()
    before = base.fingerprint()
    monkeypatch.setattr("ragserve.config.rag.PROMPT_TEMPLATE_VERSION", "v-next")
    assert base.fingerprint() != before
    monkeypatch.undo()
    assert PROMPT_TEMPLATE_VERSION != "v1"  # v1 answers are never served for v2 prompts
    for change in ({"order": "chunk_id"}, {"max_score_gap": 0.2}):
        assert base.replace(prompt=change).fingerprint() != base.fingerprint(), change
