"""ragserve in LlamaIndex: a retriever and a query engine (``pip install 'ragserve[llamaindex]'``).

**Usage:**

    from llama_index.core.query_engine import RetrieverQueryEngine
    from ragserve import Client
    from ragserve.integrations.llamaindex import RagserveQueryEngine, RagserveRetriever

    retriever = RagserveRetriever(Client("http://localhost:8000", api_key="KEY"), top_k=3)
    nodes = retriever.retrieve("Who designed the piano?")        # NodeWithScore, best first
    engine = RetrieverQueryEngine.from_args(retriever, llm=my_llm)  # LlamaIndex's own LLM answers
    answer = RagserveQueryEngine(retriever.source).query("...")   # ragserve's engine answers

The source is a ``RAG`` (in process), a ``Client`` or an ``AsyncClient``; both classes
answer ``retrieve``/``query`` and their async twins (``backend.Backend``). Each node is a
``TextNode`` whose id is ``"doc_id#chunk_id"``, whose ``ref_doc_id`` is the document, and
whose metadata holds ``doc_id``, ``chunk_id`` and ``score`` beside the chunk's own (the
LLM sees ``doc_id``, not the numbers).
"""

from __future__ import annotations

from typing import Any

from ragserve.errors import FrameworkNotInstalledError
from ragserve.integrations.backend import Backend, source_id, source_metadata
from ragserve.types import QueryResult, Source

try:
    from llama_index.core.base.base_query_engine import BaseQueryEngine
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.base.response.schema import Response
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.schema import (
        NodeRelationship,
        NodeWithScore,
        QueryBundle,
        RelatedNodeInfo,
        TextNode,
    )
except ImportError as e:  # pragma: no cover - depends on the environment
    raise FrameworkNotInstalledError("LlamaIndex", "llamaindex", e.name or "llama_index.core") from e

HIDDEN_FROM_LLM = ["chunk_id", "score"]


def to_node(source: Source) -> NodeWithScore:
    """One ragserve ``Source`` as LlamaIndex's ``NodeWithScore``."""
    node = TextNode(
        id_=source_id(source), text=source.text, metadata=source_metadata(source),
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=source.doc_id)},
        excluded_llm_metadata_keys=list(HIDDEN_FROM_LLM), excluded_embed_metadata_keys=list(HIDDEN_FROM_LLM),
    )
    return NodeWithScore(node=node, score=source.score)


def to_response(result: QueryResult) -> Response:
    """A ragserve answer as LlamaIndex's ``Response``: the text, its sources as nodes, and
    what ragserve knows about the run in ``metadata``."""
    return Response(response=result.answer, source_nodes=[to_node(s) for s in result.sources],
                    metadata={"cache_tier": result.cache_tier, "model": result.model,
                              "request_id": result.request_id, "index_fingerprint": result.index_fingerprint,
                              "timings_ms": result.timings.as_dict(), "finish_reason": result.finish_reason})


class RagserveRetriever(BaseRetriever):
    """ragserve's retrieval (embedding, FAISS, the docstore; no LLM) as a LlamaIndex
    retriever: ``retrieve`` / ``aretrieve`` return the top ``top_k`` chunks as
    ``NodeWithScore`` (cosine score, best first). ``top_k=None``: the server's (or the
    ``RAG``'s) ``query.top_k``. It works wherever LlamaIndex takes a retriever:
    ``RetrieverQueryEngine``, routers, fusion retrievers."""

    def __init__(self, source: Any, *, top_k: int | None = None,
                 callback_manager: CallbackManager | None = None, verbose: bool = False) -> None:
        self.backend = Backend(source)
        self.top_k = top_k
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @property
    def source(self) -> Any:
        """What answers: the ``RAG`` or client given."""
        return self.backend.source

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [to_node(s) for s in self.backend.retrieve(query_bundle.query_str, self.top_k)]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [to_node(s) for s in await self.backend.aretrieve(query_bundle.query_str, self.top_k)]


class RagserveQueryEngine(BaseQueryEngine):
    """ragserve's whole pipeline (answer caches, retrieval, its own generator) as a
    LlamaIndex query engine: ``query`` / ``aquery`` return a ``Response`` whose
    ``source_nodes`` are the sources the answer was grounded in. ``options`` go to each
    ``query`` (``namespace``, ``cache_read``, ``timeout_s``...). ``retrieve`` is the
    retrieval alone, as ``RagserveRetriever`` gives it."""

    def __init__(self, source: Any, *, top_k: int | None = None,
                 callback_manager: CallbackManager | None = None, **options: Any) -> None:
        self.backend = Backend(source)
        self.top_k = top_k
        self.options = options
        super().__init__(callback_manager=callback_manager)

    def _get_prompt_modules(self) -> dict[str, Any]:
        return {}  # the prompt is ragserve's (generators/prompt.py), on the server's side

    def retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [to_node(s) for s in self.backend.retrieve(query_bundle.query_str, self.top_k)]

    def _query(self, query_bundle: QueryBundle) -> Response:
        return to_response(self.backend.query(query_bundle.query_str, self.top_k, **self.options))

    async def _aquery(self, query_bundle: QueryBundle) -> Response:
        return to_response(await self.backend.aquery(query_bundle.query_str, self.top_k, **self.options))
