"""ragserve in LangChain: a retriever and an answering ``Runnable`` (``pip install 'ragserve[langchain]'``).

**Usage:**

    from ragserve import Client
    from ragserve.integrations.langchain import RagserveAnswer, RagserveRetriever

    rag = Client("http://localhost:8000", api_key="KEY")      # or RAG.from_index(...), AsyncClient(...)
    docs = RagserveRetriever(source=rag, k=3).invoke("Who designed the piano?")
    out = RagserveAnswer(source=rag).invoke("Who designed the piano?")
    print(out["answer"], [d.metadata["doc_id"] for d in out["context"]])

``RagserveRetriever`` is ragserve's retrieval (no LLM) as a ``BaseRetriever``: ``k`` in the
constructor or per call (``invoke(q, k=1)``), ``None`` for the server's ``query.top_k``.
``RagserveAnswer`` is the whole pipeline (caches, retrieval, ragserve's generator) as a
``Runnable``: its input is the question, or a dict with ``input`` / ``question`` /
``query``; its output has the keys of LangChain's ``create_retrieval_chain`` — ``input``,
``context`` (the sources as ``Document``s), ``answer`` — and ``cache_tier``, ``model``,
``request_id``, ``timings_ms``. ``stream`` / ``astream`` yield the same dict in pieces
(``context`` first, then the answer as it is generated), which add up to ``invoke``'s.

Each ``Document`` has the chunk's text, the id ``"doc_id#chunk_id"`` and, in ``metadata``,
``doc_id``, ``chunk_id`` and ``score`` beside the chunk's own metadata.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from ragserve.errors import FrameworkNotInstalledError
from ragserve.integrations.backend import Backend, question_of, source_id, source_metadata
from ragserve.types import DoneEvent, QueryResult, Source, SourcesEvent, StreamEvent, TokenEvent

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnableConfig, RunnableSerializable
    from langchain_core.runnables.utils import AddableDict
    from pydantic import ConfigDict, Field, PrivateAttr
except ImportError as e:  # pragma: no cover - depends on the environment
    raise FrameworkNotInstalledError("LangChain", "langchain", e.name or "langchain_core") from e


def to_document(source: Source) -> Document:
    """One ragserve ``Source`` as LangChain's ``Document``."""
    return Document(page_content=source.text, metadata=source_metadata(source), id=source_id(source))


def to_output(question: str, result: QueryResult) -> dict[str, Any]:
    """A ragserve answer as ``RagserveAnswer``'s output (``create_retrieval_chain``'s keys)."""
    return {"input": question, "context": [to_document(s) for s in result.sources], "answer": result.answer,
            **run_facts(result)}


def run_facts(result: QueryResult) -> dict[str, Any]:
    return {"cache_tier": result.cache_tier, "model": result.model, "request_id": result.request_id,
            "timings_ms": result.timings.as_dict()}


class RagserveRetriever(BaseRetriever):
    """ragserve's retrieval (embedding, FAISS, the docstore; no LLM) as a LangChain
    retriever. ``source``: a ``RAG``, a ``Client`` or an ``AsyncClient``. ``k``: how many
    documents (per call: ``invoke(q, k=1)``); ``None`` is the server's ``query.top_k``.
    Documents come best first."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: Any = Field(exclude=True)
    k: int | None = None
    _backend: Backend = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        self._backend = Backend(self.source)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None) -> list[Document]:
        return [to_document(s) for s in self._backend.retrieve(query, self.k if k is None else k)]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       k: int | None = None) -> list[Document]:
        return [to_document(s) for s in await self._backend.aretrieve(query, self.k if k is None else k)]


class RagserveAnswer(RunnableSerializable[Any, dict[str, Any]]):
    """ragserve's answer to a question, with its sources, as a LangChain ``Runnable``
    (``invoke``, ``ainvoke``, ``batch``, ``stream``, ``astream``; callbacks and tracing see
    one chain run each). ``source``: a ``RAG``, a ``Client`` or an ``AsyncClient``;
    ``top_k`` the sources per answer (``None``: ``query.top_k``); ``options`` go to every
    query (``namespace``, ``cache_read``, ``timeout_s``...)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: Any = Field(exclude=True)
    top_k: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    _backend: Backend = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        self._backend = Backend(self.source)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> dict[str, Any]:
        return self._call_with_config(self._answer, input, config, run_type="chain", **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any) -> dict[str, Any]:
        return await self._acall_with_config(self._aanswer, input, config, run_type="chain", **kwargs)

    def stream(self, input: Any, config: RunnableConfig | None = None,
               **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield from self._transform_stream_with_config(iter([input]), self._pieces, config, run_type="chain",
                                                      **kwargs)

    async def astream(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        async def one() -> AsyncIterator[Any]:
            yield input

        async for piece in self._atransform_stream_with_config(one(), self._apieces, config, run_type="chain",
                                                               **kwargs):
            yield piece

    # -- the work, once LangChain has opened the run -------------------------------------

    def _answer(self, input: Any) -> dict[str, Any]:
        question = question_of(input)
        return to_output(question, self._backend.query(question, self.top_k, **self.options))

    async def _aanswer(self, input: Any) -> dict[str, Any]:
        question = question_of(input)
        return to_output(question, await self._backend.aquery(question, self.top_k, **self.options))

    def _pieces(self, inputs: Iterator[Any]) -> Iterator[AddableDict]:
        question = question_of(next(iter(inputs)))
        yield AddableDict(input=question)
        for event in self._backend.stream(question, self.top_k, **self.options):
            yield piece_of(event)

    async def _apieces(self, inputs: AsyncIterator[Any]) -> AsyncIterator[AddableDict]:
        question = question_of(await anext(aiter(inputs)))
        yield AddableDict(input=question)
        events = self._backend.astream(question, self.top_k, **self.options)
        if events is None:  # a blocking Client: the whole answer, from a worker thread
            result = await self._backend.aquery(question, self.top_k, **self.options)
            yield AddableDict({k: v for k, v in to_output(question, result).items() if k != "input"})
            return
        async for event in events:
            yield piece_of(event)


def piece_of(event: StreamEvent) -> AddableDict:
    """One stream event as a piece of ``RagserveAnswer``'s output."""
    if isinstance(event, SourcesEvent):
        return AddableDict(context=[to_document(s) for s in event.sources], cache_tier=event.cache_tier)
    if isinstance(event, TokenEvent):
        return AddableDict(answer=event.text)
    if isinstance(event, DoneEvent):
        facts = run_facts(event.result)
        del facts["cache_tier"]  # the sources event gave it; adding it again would double the text
        return AddableDict(answer="", **facts)  # "": an empty answer still has the key
    raise TypeError(f"not a stream event: {event!r}")
