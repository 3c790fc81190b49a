"""``ragserve batch``: answers appended as they complete, resume, failures recorded."""

import asyncio
import contextlib

import orjson
import pytest

from ragserve.errors import BatchInputError
from ragserve.jobs.batch import answered_ids, read_questions, run_batch
from ragserve.testing.fakes import FakeGenerator, fake_rag, opening


def write_questions(path, n, poison_at=None):
    lines = []
    for i in range(n):
        q = "poison question" if i == poison_at else f"question {i}"
        lines.append(orjson.dumps({"id": f"q{i}", "question": q}))
    path.write_bytes(b"\n".join(lines) + b"\n")


def records(path):
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_bad_questions_files_are_refused_with_the_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "fine"}\n{"question": \n')
    with pytest.raises(BatchInputError, match=r"q.jsonl:2: not valid JSON"):
        read_questions(bad)
    bad.write_text('{"id": 1, "question": "a"}\n{"id": 1, "question": "b"}\n')
    with pytest.raises(BatchInputError, match="id '1' appears twice"):
        read_questions(bad)
    bad.write_text('{"text": "no question field"}\n')
    with pytest.raises(BatchInputError, match="question"):
        read_questions(bad)
    bad.write_text('"a bare string"\n\n{"question": "with default id"}\n')
    assert read_questions(bad) == [("1", "a bare string"), ("3", "with default id")]


def test_interrupted_run_resumes_without_repeating_or_losing_an_answer(tmp_path):
    questions, out = tmp_path / "q.jsonl", tmp_path / "answers.jsonl"
    write_questions(questions, 12, poison_at=5)
    with fake_rag(tmp_path / "index", FakeGenerator(fail_on="poison", delay=0.05)) as rag:
        resume_after_interruption(rag, questions, out)


def resume_after_interruption(fake_rag, questions, out):

    async def interrupted():
        task = asyncio.current_task()

        def stop_after_four(record, summary):
            if summary.done + summary.failed == 4:
                task.cancel()  # like Ctrl-C: the answers still in the engine are lost

        with contextlib.suppress(asyncio.CancelledError):
            await run_batch(fake_rag, questions, out, concurrency=3, on_record=stop_after_four)

    asyncio.run(interrupted())
    first = records(out)
    assert len(first) == 4
    with out.open("ab") as f:
        f.write(b'{"id": "q11", "question": "question 11", "ans')  # a crash mid-write
    summary = asyncio.run(run_batch(fake_rag, questions, out, concurrency=3))
    final = records(out)  # the half line is gone: every line parses
    answered = [r["id"] for r in final if "answer" in r]
    assert sorted(answered) == sorted({f"q{i}" for i in range(12)} - {"q5"})
    assert len(answered) == len(set(answered))  # nothing answered twice
    assert summary.skipped == len([r for r in first if "answer" in r])
    assert summary.failed == 1 and summary.done == 11 - summary.skipped
    failed = [r for r in final if r["id"] == "q5"]
    assert failed and all("RuntimeError: boom" in r["error"] for r in failed)
    assert answered_ids(out) == set(answered)


@pytest.mark.engine
def test_cli_batch_on_the_real_engine(rag, xquad_corpus, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ragserve.cli import main as cli
    from ragserve.rag import RAG

    questions, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qs = [q["question"] for q in xquad_corpus[1][100:106]]  # asked by no other test
    questions.write_bytes(b"\n".join(orjson.dumps({"id": i, "question": q}) for i, q in enumerate(qs)) + b"\n")

    @contextlib.contextmanager
    def session_engine(path, cfg=None):
        yield rag  # the test session's one engine; the CLI must not close it

    monkeypatch.setattr(RAG, "from_index", session_engine)
    result = CliRunner().invoke(cli.app, ["batch", "unused-index", str(questions), "--out", str(out),
                                          "--concurrency", "4"])
    assert result.exit_code == 0, result.output
    assert "done 6, failed 0, skipped 0" in result.output
    got = records(out)
    assert sorted(r["id"] for r in got) == [str(i) for i in range(6)] and all(r["answer"] for r in got)
    again = CliRunner().invoke(cli.app, ["batch", "unused-index", str(questions), "--out", str(out)])
    assert again.exit_code == 0 and "skipped 6" in again.output and len(records(out)) == 6


def test_cli_batch_opens_the_engine_and_exits_2_when_a_question_failed(fake_rag, tmp_path,
                                                                      monkeypatch):
    from typer.testing import CliRunner

    from ragserve.cli import main as cli

    questions, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    write_questions(questions, 5, poison_at=2)  # the fixture's generator fails on "poison"
    opened = opening(monkeypatch, fake_rag)
    result = CliRunner().invoke(cli.app, ["batch", "some-index", str(questions), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "done 4, failed 1, skipped 0" in result.output and opened == ["some-index"]
    assert [r["id"] for r in records(out) if "error" in r] == ["q2"]
