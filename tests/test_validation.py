"""Question validation, key normalisation and the cache codec: examples, then properties
(hypothesis) over any string the public API can be handed."""

import re
import unicodedata

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ragserve.cache.entries import CachedAnswer, CachedSource, decode_answer, encode_answer
from ragserve.cache.keys import cache_key, normalize_question
from ragserve.engine.validation import check_question
from ragserve.errors import (
    EmptyQuestionError,
    InputError,
    InvalidParameterError,
    InvalidTextError,
    QuestionTooLongError,
    QuestionTypeError,
)

LIMIT = 200
KEY = dict(index_fingerprint="i" * 64, answer_fingerprint="a" * 64, namespace="default")
# Every code point, surrogates and controls included: what a caller can put in a str.
any_text = st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=300)


@pytest.mark.parametrize(("value", "name"), [(None, "NoneType"), (42, "int"), (b"what?", "bytes"),
                                             (["q"], "list")])
def test_a_non_string_question_says_what_it_got(value, name):
    with pytest.raises(QuestionTypeError, match=f"must be a str, got {name}") as e:
        check_question(value, LIMIT)
    assert "empty" not in str(e.value)
    if isinstance(value, bytes):
        assert "decode" in str(e.value)


@pytest.mark.parametrize(("text", "pattern"), [
    ("What was the \ud800 Apollo program?", r"lone surrogate U\+D800 at position 13"),
    ("bad byte \udcff here", r"U\+DCFF at position 9 \(the byte 0xFF"),
    ("a\x00b", r"control character U\+0000 \(NUL\) at position 1"),
    ("\x1b[31mred", r"U\+001B \(ESC\) at position 0"),
    ("del\x7f", r"U\+007F \(DEL\)"),
    ("c1\x9bcontrol", r"U\+009B at position 2"),
])
def test_text_that_is_not_a_question_names_the_code_point_and_where(text, pattern):
    with pytest.raises(InvalidTextError, match=pattern) as e:
        check_question(text, LIMIT)
    assert text not in str(e.value)  # the bad text itself is never echoed back


def test_whitespace_controls_collapse_and_format_characters_stay():
    assert check_question(" tab\tline\nfeed\r\x0b\x0c\x1c\x85 end ", LIMIT) == "tab line feed end"
    assert check_question("ＦＡＩＳＳ\u00a0index", LIMIT) == "FAISS index"
    assert check_question("family 👨\u200d👩\u200d👧 and \ufeffbom", LIMIT) == "family 👨\u200d👩\u200d👧 and \ufeffbom"


def test_empty_and_too_long():
    for blank in ("", "   ", "\t\n\u3000"):
        with pytest.raises(EmptyQuestionError):
            check_question(blank, LIMIT)
    assert check_question("x" * LIMIT, LIMIT) == "x" * LIMIT
    with pytest.raises(QuestionTooLongError, match=f"{LIMIT + 1} characters, over the limit of {LIMIT}"):
        check_question("x" * (LIMIT + 1), LIMIT)
    # whitespace that normalisation removes does not count ...
    assert check_question("x " + " " * 300 + "y", LIMIT) == "x y"
    # ... but a huge input is refused before any normalisation work
    with pytest.raises(QuestionTooLongError, match="before normalisation"):
        check_question(" " * 10_000_000 + "x", LIMIT)


def test_cache_key_refuses_text_that_is_not_unicode_with_an_input_error():
    with pytest.raises(InvalidTextError, match="question"):
        cache_key("\ud800", **KEY)
    with pytest.raises(InvalidTextError, match="namespace"):
        cache_key("q", **{**KEY, "namespace": "tenant \udcff"})
    with pytest.raises(InvalidParameterError, match="namespace must be a str"):
        cache_key("q", **{**KEY, "namespace": 42})


# -- properties -------------------------------------------------------------------------------

_REFUSED_CHAR = re.compile("[\ud800-\udfff]")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_text)
@example("What was the \ud800 Apollo program?")
@example("\u0301 ")
@example(" \u0301")
@example("ﬀ\u0301")
def test_any_string_validates_or_raises_an_input_error(text):
    try:
        q = check_question(text, LIMIT)
    except InputError:
        return
    # A validated question is clean, normalised, within the limit, and stable.
    assert q and q == q.strip() and "  " not in q and len(q) <= LIMIT
    assert not _REFUSED_CHAR.search(q)
    assert not any(unicodedata.category(c) == "Cc" and not c.isspace() for c in q)
    assert check_question(q, LIMIT) == q  # asking again with r.question hits the same key
    q.encode("utf-8")  # never raises for a validated question
    key = cache_key(q, **KEY)
    assert re.fullmatch("[0-9a-f]{64}", key) and key == cache_key(check_question(text, LIMIT), **KEY)


@settings(max_examples=300, deadline=None)
@given(any_text, st.text(max_size=20))
def test_cache_key_is_a_key_or_an_input_error(text, namespace):
    try:
        key = cache_key(normalize_question(text), **{**KEY, "namespace": namespace})
    except InputError:
        assert _REFUSED_CHAR.search(text)  # only text that is not Unicode is refused here
        return
    assert re.fullmatch("[0-9a-f]{64}", key)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=50), st.text(max_size=50))
def test_different_normalised_questions_never_share_a_key(a, b):
    na, nb = normalize_question(a), normalize_question(b)
    assert (cache_key(na, **KEY) == cache_key(nb, **KEY)) == (na == nb)


# NOTE: finite floats only. JSON has no inf/NaN (msgspec writes null, so they would not
# round-trip); none reach the cache: FAISS scores are filtered to finite values and chunk
# metadata comes from the docstore's JSON.
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
sources = st.builds(CachedSource, doc_id=st.text(), chunk_id=st.integers(0, 2 ** 40),
                    score=st.floats(allow_nan=False, allow_infinity=False), text=st.text(),
                    metadata=st.dictionaries(st.text(max_size=8), json_value, max_size=3))
answers = st.builds(CachedAnswer, question=st.text(), answer=st.text(), sources=st.lists(sources, max_size=3),
                    model=st.text(max_size=10), index_fingerprint=st.text(max_size=64),
                    prompt_tokens=st.integers(0, 10 ** 6), completion_tokens=st.integers(0, 10 ** 6),
                    finish_reason=st.none() | st.sampled_from(["stop", "length"]),
                    dropped_sources=st.integers(0, 100), created_at=st.floats(0, 4e9))


@settings(max_examples=200, deadline=None)
@given(answers)
def test_cache_codec_round_trips(value):
    assert decode_answer(encode_answer(value)) == value


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | answers.map(encode_answer).map(lambda b: b[: len(b) // 2]))
def test_cache_codec_refuses_garbage_with_its_own_errors_only(data):
    try:
        decode_answer(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass  # what l2.get counts as a miss; anything else would escape it
