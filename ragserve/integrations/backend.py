"""``Backend``: the one thing every adapter asks, whatever it was given — an in-process
``RAG``, a blocking ``Client`` or an ``AsyncClient``.

The three have the same verbs and types (``ragserve.client`` mirrors ``RAG``), but not the
same halves: a ``Client`` only blocks and an ``AsyncClient`` only awaits. A framework calls
both (LangChain's ``invoke`` / ``ainvoke``, LlamaIndex's ``retrieve`` / ``aretrieve``), so
the backend fills the missing async half of a blocking source with a worker thread, and
refuses the missing blocking half of an ``AsyncClient`` with an ``IntegrationError`` that
says what to pass instead: its connection pool belongs to one event loop, and running it
on a second loop from a blocking call would break it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ragserve.errors import IntegrationError, InvalidParameterError
from ragserve.types import QueryResult, Source, StreamEvent

SYNC = ("retrieve", "query", "stream")
ASYNC = ("aretrieve", "aquery", "astream")


class Backend:
    """``source``'s verbs, both halves. ``source`` is a ``RAG``, a ``Client``, an
    ``AsyncClient``, or any object with the blocking verbs (``retrieve``, ``query``,
    ``stream``) or the async ones (``aretrieve``, ``aquery``, ``astream``) of ``RAG``."""

    def __init__(self, source: Any) -> None:
        if isinstance(source, Backend):
            source = source.source
        self.blocking = all(callable(getattr(source, v, None)) for v in SYNC)
        self.awaiting = all(callable(getattr(source, v, None)) for v in ASYNC)
        if not (self.blocking or self.awaiting):
            raise IntegrationError(
                f"cannot answer from a {type(source).__name__}: pass a ragserve.RAG, a ragserve.Client "
                "or a ragserve.AsyncClient")
        self.source = source

    def __repr__(self) -> str:
        return f"Backend({self.source!r})"

    # -- blocking ------------------------------------------------------------------------

    def retrieve(self, question: str, top_k: int | None) -> list[Source]:
        return self._sync("retrieve")(question, top_k)

    def query(self, question: str, top_k: int | None, **options: Any) -> QueryResult:
        return self._sync("query")(question, top_k=top_k, **options)

    def stream(self, question: str, top_k: int | None, **options: Any) -> Iterator[StreamEvent]:
        return self._sync("stream")(question, top_k=top_k, **options)

    # -- async ---------------------------------------------------------------------------

    async def aretrieve(self, question: str, top_k: int | None) -> list[Source]:
        if self.awaiting:
            return await self.source.aretrieve(question, top_k)
        return await asyncio.to_thread(self.source.retrieve, question, top_k)

    async def aquery(self, question: str, top_k: int | None, **options: Any) -> QueryResult:
        if self.awaiting:
            return await self.source.aquery(question, top_k=top_k, **options)
        # NOTE: a cancelled caller leaves this thread's request to finish on the server (its
        # answer is then cached); pass an AsyncClient to have cancelling abort it there too.
        return await asyncio.to_thread(lambda: self.source.query(question, top_k=top_k, **options))

    def astream(self, question: str, top_k: int | None, **options: Any) -> AsyncIterator[StreamEvent] | None:
        """The events as they come, or None for a blocking-only source (the caller then
        awaits ``aquery`` and yields the whole answer at once)."""
        if self.awaiting:
            return self.source.astream(question, top_k=top_k, **options)
        return None

    def _sync(self, verb: str) -> Any:
        if not self.blocking:
            raise IntegrationError(
                f"{type(self.source).__name__} has only async verbs and cannot serve the blocking "
                f"{verb!r}: call the adapter's async method (ainvoke, aretrieve, aquery), or pass a "
                "ragserve.Client (blocking; the async methods then run it in a thread) or a "
                "ragserve.RAG (both)")
        return getattr(self.source, verb)


def question_of(value: Any) -> str:
    """The question in a framework's input: the string itself, or a dict's ``input``,
    ``question`` or ``query`` (LangChain chains name it each of these ways). Anything else
    passes through, so the engine's own check names what is wrong with it."""
    if isinstance(value, dict):
        for key in ("input", "question", "query"):
            if key in value:
                return value[key]
        raise InvalidParameterError("input", sorted(value), "a question string, or a dict with an "
                                    "'input', 'question' or 'query' key")
    return value


def source_id(source: Source) -> str:
    """A chunk's id across both frameworks: unique within one index version."""
    return f"{source.doc_id}#{source.chunk_id}"


def source_metadata(source: Source) -> dict[str, Any]:
    """What a framework's document carries besides the text: the chunk's own metadata,
    then ragserve's ``doc_id``, ``chunk_id`` and ``score`` (they win over a same-named key)."""
    return {**source.metadata, "doc_id": source.doc_id, "chunk_id": source.chunk_id, "score": source.score}
