"""No public-API path lets a builtin exception through for bad input: every refusal is an
``InputError`` raised before any work (fake models; the real tokenizer: test_isolation.py)."""

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ragserve.cli.main import app
from ragserve.errors import InputError, InvalidParameterError, InvalidTextError, QuestionTypeError

any_text = st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=60)
non_strings = st.none() | st.integers() | st.binary(max_size=8) | st.floats() | st.lists(st.text(max_size=3), max_size=2)
questions = any_text | non_strings
HYPO = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _fine_or_input_error(call):
    try:
        call()
    except InputError:
        return "refused"
    return "answered"


@HYPO
@given(q=questions)
@example(q="What was the \ud800 Apollo program?")
@example(q="\xff is fine, \udcff is not")
@example(q=b"bytes")
def test_query_aquery_retrieve_refuse_with_input_errors_only(fake_rag, q):  # noqa: F811
    import asyncio

    work = (fake_rag.embedder.calls, len(fake_rag.generator.prompts))
    outcomes = {
        _fine_or_input_error(lambda: fake_rag.query(q, cache_read=False, cache_write=False)),
        _fine_or_input_error(lambda: fake_rag.retrieve(q)),
        _fine_or_input_error(lambda: asyncio.run(fake_rag.aquery(q, cache_read=False, cache_write=False))),
        _fine_or_input_error(lambda: asyncio.run(fake_rag.aretrieve(q))),
        _fine_or_input_error(lambda: list(fake_rag.stream(q, cache_read=False, cache_write=False))),
    }
    assert len(outcomes) == 1  # every entry point agrees on what a question is
    if outcomes == {"refused"}:  # ... and refuses before any work
        assert (fake_rag.embedder.calls, len(fake_rag.generator.prompts)) == work


@HYPO
@given(qs=st.lists(questions, min_size=1, max_size=4))
def test_query_batch_puts_input_errors_in_their_slots(fake_rag, qs):  # noqa: F811
    out = fake_rag.query_batch(qs)
    assert len(out) == len(qs)
    for r in out:
        assert not isinstance(r, Exception) or isinstance(r, InputError), repr(r)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"top_k": "3"}, InvalidParameterError), ({"top_k": -1}, InvalidParameterError),
    ({"top_k": 2.5}, InvalidParameterError), ({"top_k": True}, InvalidParameterError),
])
def test_bad_top_k_is_an_input_error(fake_rag, kwargs, error):  # noqa: F811
    with pytest.raises(error, match="top_k must be"):
        fake_rag.retrieve("fine question", **kwargs)
    assert fake_rag.embedder.calls == 0


@pytest.mark.parametrize("namespace", ["tenant \udcff", 42])
def test_bad_namespace_is_an_input_error(fake_rag, namespace):  # noqa: F811
    with pytest.raises(InputError, match="namespace"):
        fake_rag.query("fine question", namespace=namespace)
    assert fake_rag.embedder.calls == 0


def test_the_issue_examples(fake_rag):  # noqa: F811
    with pytest.raises(InvalidTextError, match="lone surrogate U\\+D800"):
        fake_rag.query("\ud800")
    with pytest.raises(QuestionTypeError, match="got int"):
        fake_rag.query(42)


# -- CLI: refused before any index or model is opened -----------------------------------------


@pytest.mark.parametrize(("question", "message"), [
    ("What is \udcff?", "the byte 0xFF"),  # how a shell passes the byte \xff (surrogateescape)
    ("bell\x07", "U+0007"),
    ("   ", "empty"),
])
def test_cli_query_refuses_a_bad_question_before_opening_anything(tmp_path, question, message):
    # The index does not exist: had the command got as far as opening it, it would say so.
    r = CliRunner().invoke(app, ["query", str(tmp_path / "no-index"), question])
    assert r.exit_code == 1, r.output
    assert "[input]" in r.output and message in r.output and "no index folder" not in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 3


def test_cli_batch_names_every_bad_line_before_opening_anything(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('"fine"\n{"id": "ctrl", "question": "a\\u0000b"}\n"  "\n"also fine"\n', encoding="utf-8")
    r = CliRunner().invoke(app, ["batch", str(tmp_path / "no-index"), str(questions), "--out", str(tmp_path / "a")])
    assert r.exit_code == 1, r.output
    assert "no index folder" not in r.output and "Traceback" not in r.output
    assert "'ctrl'" in r.output and "U+0000" in r.output and "'3'" in r.output and "empty" in r.output
