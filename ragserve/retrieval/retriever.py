"""Retrieval: embed (micro-batched) → search (FAISS, batched) → docload (lazy).

Concurrent questions that arrive together share one embedding call and one FAISS search
(``MicroBatcher``); both run on a one-thread executor, never on the event loop. The
embedding model uses its own intra-op threads, and one model call at a time keeps them
from fighting each other.

**Usage:** ``sources = await Retriever(embedder, index, docstore, EmbedConfig()).retrieve(q, 3, clock)``
"""

from __future__ import annotations

import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np

from ragserve.config import EmbedConfig
from ragserve.errors import InvalidParameterError
from ragserve.observe.timing import StageClock
from ragserve.retrieval.embed import MicroBatcher
from ragserve.types import DocStore, Embedder, Hit, Source, Sources, VectorIndex

_Searched = tuple[list[Hit], float, float, np.ndarray, tuple[str, ...]]
"""One item's search: its hits, the batch's embed and search ms, its vector, the shards
that did not answer the batch's search (a sharded index that allows partial answers)."""


class Retriever:
    def __init__(self, embedder: Embedder, index: VectorIndex, docstore: DocStore, config: EmbedConfig,
                 executor: Executor | None = None) -> None:
        """``executor``: a one-thread executor shared with other retrievers over the same
        model (the snapshots of a reload); by default the retriever makes and owns its own."""
        self.embedder = embedder
        self.index = index
        self.docstore = docstore
        self._owns_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragserve-embed")
        window, most = config.batch_window_ms / 1000, config.max_batch
        self.batcher: MicroBatcher[tuple[str, int, np.ndarray | None], _Searched] = MicroBatcher(
            self._embed_search, self.executor, window_s=window, max_batch=most)
        self.embeds: MicroBatcher[str, tuple[np.ndarray, float]] = MicroBatcher(
            self._embed_only, self.executor, window_s=window, max_batch=most)
        """Embedding alone (the semantic tier's lookup): its vector is then handed to
        ``retrieve``, so a question is embedded once."""

    async def retrieve(self, question: str, top_k: int, clock: StageClock) -> Sources:
        """Top-k sources for a normalised question; stage times go into ``clock``:
        ``embed_wait`` (for the batch to start), ``embed`` and ``search`` (the batch's)
        and ``docload``. ``Sources.missing_shards`` names the shards of a sharded index
        that did not answer (``ray.allow_partial``; else such a search raises)."""
        return (await self.retrieve_with_vector(question, top_k, clock))[0]

    async def retrieve_with_vector(self, question: str, top_k: int, clock: StageClock,
                                   vector: np.ndarray | None = None) -> tuple[Sources, np.ndarray]:
        """``retrieve``, and the question's vector; ``vector``: the question's, already
        computed by ``embed`` (then only the search runs)."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InvalidParameterError("top_k", top_k, "a positive int")
        searched, wait_ms = await self.batcher.submit((question, top_k, vector))
        hits, embed_ms, search_ms, vector, missing = searched
        clock.add("embed_wait", wait_ms)
        clock.add("embed", embed_ms)
        clock.add("search", search_ms)
        with clock.span("docload"):
            chunks = self.docstore.get_many([h.chunk_id for h in hits])
        sources = [Source(c.doc_id, c.chunk_id, h.score, c.text, c.metadata) for c, h in zip(chunks, hits)]
        return Sources(sources, missing), vector

    async def embed(self, question: str, clock: StageClock) -> np.ndarray:
        """The question's unit vector, micro-batched with concurrent questions."""
        (vector, embed_ms), wait_ms = await self.embeds.submit(question)
        clock.add("embed_wait", wait_ms)
        clock.add("embed", embed_ms)
        return vector

    def _embed_only(self, questions: list[str]) -> list[tuple[np.ndarray, float]]:
        t0 = time.perf_counter()
        vectors = self.embedder.encode(questions)
        ms = (time.perf_counter() - t0) * 1e3
        return [(v, ms) for v in vectors]

    def _embed_search(self, items: list[tuple[str, int, np.ndarray | None]]) -> list[_Searched]:
        """One model call (for the items that bring no vector) and one FAISS search for a
        whole micro-batch (on the executor)."""
        t0 = time.perf_counter()
        todo = [i for i, (_, _, v) in enumerate(items) if v is None]
        vectors: list[Any] = [v for _, _, v in items]
        if todo:
            for i, v in zip(todo, self.embedder.encode([items[i][0] for i in todo]), strict=True):
                vectors[i] = v
        matrix = np.ascontiguousarray(np.stack(vectors), dtype=np.float32)
        t1 = time.perf_counter()
        k_most = max(k for _, k, _ in items)
        marked = getattr(self.index, "search_marked", None)  # a sharded index: which shards answered
        if marked is not None:
            rows, missing = marked(matrix, k_most)
        else:
            rows, missing = self.index.search(matrix, k_most), ()
        t2 = time.perf_counter()
        embed_ms, search_ms = ((t1 - t0) * 1e3 if todo else 0.0), (t2 - t1) * 1e3
        return [(row[:k], embed_ms if v is None else 0.0, search_ms, matrix[i], missing)
                for i, (row, (_, k, v)) in enumerate(zip(rows, items, strict=True))]

    def stats(self) -> dict[str, Any]:
        b = self.batcher
        return {"batches": b.batches, "queries": b.items, "queued": b.queued,
                "mean_batch": round(b.items / b.batches, 2) if b.batches else 0.0,
                "embed_only_batches": self.embeds.batches}

    def close(self) -> None:
        if self._owns_executor:
            self.executor.shutdown(wait=True)
        close = getattr(self.docstore, "close", None)
        if close:
            close()
