"""Offline batch answering: a JSONL file of questions in, a JSONL file of answers out.

- Bounded concurrency: at most ``concurrency`` questions are in the engine at once, so
  vLLM batches them and nothing queues without bound (``work_through``, which
  ``ragserve warm`` shares).
- Every answer is appended and flushed as soon as it is ready: an interrupted run loses
  at most the answers still being generated.
- Resume: on restart, ids that already have an answer in the output are skipped. Failed
  questions are retried (the last record of an id is the one that counts). A half-written
  last line, left by a crash, is cut off before anything is appended.
- One failed question is recorded with its error and does not stop the run.

Input lines are ``{"id": ..., "question": ..., "model": ...}`` (``id`` optional: the line
number is used; ``model`` optional: one of ``[models]``, else the run's ``model``, else the
default) or a bare JSON string. Output lines carry the id, question, answer, the model that
answered, sources, cache tier, token usage and per-stage timings; a failure carries
``error`` instead of ``answer``.

**Usage:** ``summary = asyncio.run(run_batch(rag, "questions.jsonl", "answers.jsonl"))``
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ragserve.errors import BatchInputError, InputError

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchSummary:
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "done": self.done, "failed": self.failed, "skipped": self.skipped,
                "seconds": round(self.seconds, 2), "questions_per_s": round(self.per_second, 3)}


def read_questions(path: str | Path) -> list[tuple[str, str]]:
    """``(id, question)`` pairs; refuses the whole file on a bad line or a repeated id."""
    return [(qid, question) for qid, question, _ in read_lines(path)]


def read_lines(path: str | Path) -> list[tuple[str, str, str | None]]:
    """``(id, question, model)`` per line (``model``: the line's, or None); refuses the
    whole file on a bad line, a repeated id or a model that is not a string."""
    path = Path(path)
    if not path.is_file():
        raise BatchInputError(f"{path}: no such questions file")
    items: list[tuple[str, str, str | None]] = []
    seen: set[str] = set()
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise BatchInputError(f"{path}:{n}: not valid JSON ({e})") from None
        if isinstance(value, str):
            value = {"question": value}
        if not isinstance(value, dict) or not isinstance(value.get("question"), str):
            raise BatchInputError(f"{path}:{n}: expected a JSON string or an object with a \"question\" string")
        qid = str(value.get("id", n))
        if qid in seen:
            raise BatchInputError(f"{path}:{n}: id {qid!r} appears twice; ids must be unique for resume to work")
        model = value.get("model")
        if model is not None and not isinstance(model, str):
            raise BatchInputError(f"{path}:{n}: \"model\" must be a string (a name of [models]), got {model!r}")
        seen.add(qid)
        items.append((qid, value["question"], model))
    return items


def check_questions(items: list[tuple[str, str]], max_chars: int, path: str | Path, *, show: int = 10) -> None:
    """Refuse a questions file with questions that cannot be asked, naming each one (up to
    ``show``) and why, so that all of them can be fixed at once before any model loads."""
    from ragserve.engine.validation import check_question

    bad = []
    for qid, question in items:
        try:
            check_question(question, max_chars)
        except InputError as e:
            bad.append(f"id {qid!r}: {e.args[0]}")
    if bad:
        more = f"; and {len(bad) - show} more" if len(bad) > show else ""
        raise BatchInputError(f"{path}: {len(bad)} question(s) cannot be asked: {'; '.join(bad[:show])}{more}")


def answered_ids(out: str | Path) -> set[str]:
    """Ids with an answer in ``out``. Cuts off a half-written last line (a crash mid-write)."""
    out = Path(out)
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with out.open("r+b") as f:
            f.truncate(keep)
    done: set[str] = set()
    for line in data[:keep].splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a damaged line in the middle: its id is asked again
        if isinstance(record, dict) and "answer" in record and "error" not in record:
            done.add(str(record.get("id")))
        elif isinstance(record, dict) and "error" in record:
            done.discard(str(record.get("id")))
    return done


def _record(qid: str, question: str, result: Any) -> dict[str, Any]:
    if isinstance(result, BaseException):
        return {"id": qid, "question": question, "error": f"{type(result).__name__}: {result}"}
    return {
        "id": qid, "question": question, "answer": result.answer, "model": result.model,
        "cache_tier": result.cache_tier,
        "sources": [{"doc_id": s.doc_id, "chunk_id": s.chunk_id, "score": round(s.score, 4)} for s in result.sources],
        "usage": {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens},
        "finish_reason": result.finish_reason, "timings": result.timings.as_dict(),
    }


async def work_through(items: Sequence[T], work: Callable[[T], Awaitable[R]],
                       done: Callable[[T, R | Exception], None], concurrency: int) -> None:
    """``work`` on every item, in list order, with at most ``concurrency`` running at once;
    ``done(item, result)`` as each completes, where a failed item's result is its exception.
    One failure does not stop the others; cancellation (Ctrl-C) does, and is raised.

    The next item starts as soon as any finishes, so the engine's batch stays full
    (``ragserve batch`` and ``ragserve warm`` share this loop).
    """
    if concurrency < 1:
        raise BatchInputError(f"concurrency must be >= 1, got {concurrency}")
    queue = deque(items)

    async def worker() -> None:
        while queue:
            item = queue.popleft()
            try:
                result: R | Exception = await work(item)
            except Exception as e:  # noqa: BLE001 - handed to done(); the run goes on
                result = e
            done(item, result)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(queue)))))


def write_record(sink: Any, line: bytes, record: dict[str, Any], summary: BatchSummary, started: float,
                 on_record: Callable[[dict[str, Any], BatchSummary], None] | None) -> None:
    """Append one answer line and flush it (an interrupted run keeps it), then count it."""
    sink.write(line + b"\n")
    sink.flush()
    if "error" in record:
        summary.failed += 1
    else:
        summary.done += 1
    summary.seconds = time.perf_counter() - started
    if on_record:
        on_record(record, summary)


async def run_batch(
    rag: Any,
    questions: str | Path,
    out: str | Path,
    *,
    concurrency: int = 16,
    timeout_s: float | None = None,
    model: str | None = None,
    on_start: Callable[[BatchSummary], None] | None = None,
    on_record: Callable[[dict[str, Any], BatchSummary], None] | None = None,
) -> BatchSummary:
    """Answer every question of ``questions`` not yet answered in ``out`` (see module doc).
    ``model``: for the lines that name none (None: the default, or the router's pick). A
    model not configured fails its lines only, each with ``UnknownModelError``
    (``ragserve batch`` refuses the file before the engine starts instead)."""
    items = read_lines(questions)
    done_ids = answered_ids(out)
    todo = [(qid, q, m or model) for qid, q, m in items if qid not in done_ids]
    summary = BatchSummary(total=len(items), skipped=len(items) - len(todo))
    if on_start:
        on_start(summary)
    started = time.perf_counter()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "ab") as sink:

        async def ask(item: tuple[str, str, str | None]) -> Any:
            return await rag.aquery(item[1], timeout_s=timeout_s, model=item[2])

        def done(item: tuple[str, str, str | None], result: Any) -> None:
            record = _record(item[0], item[1], result)
            write_record(sink, orjson.dumps(record), record, summary, started, on_record)

        try:
            await work_through(todo, ask, done, concurrency)
        finally:
            sink.flush()
            os.fsync(sink.fileno())
            summary.seconds = time.perf_counter() - started
    return summary
