import pytest

from ragserve.errors import QuestionTooLongError
from ragserve.prompt import PromptBuilder
from ragserve.types import Source


class WordTokenizer:
    """A stand-in tokenizer: one token per whitespace-separated word."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}> {m['content']} </{m['role']}> " for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens=False):
        return text.split()

    def decode(self, ids):
        return " ".join(ids)


def _sources(n, words=50):
    return [Source(f"d{i}", i, 1.0 - i / 10, " ".join([f"w{i}"] * words)) for i in range(n)]


def test_everything_fits():
    p = PromptBuilder(WordTokenizer(), 2048, 64).build("what is w1?", _sources(3))
    assert p.dropped == 0 and len(p.used) == 3
    assert "[source 1: d0]" in p.text and "[end of source 3]" in p.text
    assert p.text.index("Question: what is w1?") > p.text.index("[end of source 3]")
    assert p.tokens + 64 <= 2048


def test_lowest_ranked_are_dropped_to_fit():
    builder = PromptBuilder(WordTokenizer(), 260, 64)  # room for about three 50-word sources
    p = builder.build("what?", _sources(6))
    assert 0 < len(p.used) < 6
    assert [s.chunk_id for s in p.used] == list(range(len(p.used)))  # best first, kept in rank order
    assert p.dropped == 6 - len(p.used)
    assert p.tokens <= 260 - 64


def test_best_source_alone_too_long_is_cut_not_dropped():
    p = PromptBuilder(WordTokenizer(), 200, 64).build("what?", _sources(2, words=500))
    assert len(p.used) == 1 and p.used[0].metadata["truncated"] is True
    assert p.dropped == 1
    assert p.tokens <= 200 - 64


def test_question_that_cannot_fit_is_refused():
    with pytest.raises(QuestionTooLongError, match="prompt tokens"):
        PromptBuilder(WordTokenizer(), 100, 64).build("word " * 200, _sources(1))
