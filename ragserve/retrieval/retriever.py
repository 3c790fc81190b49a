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

from ragserve.config import EmbedConfig
from ragserve.errors import InvalidParameterError
from ragserve.observe.timing import StageClock
from ragserve.retrieval.embed import MicroBatcher
from ragserve.types import DocStore, Embedder, Hit, Source, VectorIndex


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
        self.batcher: MicroBatcher[tuple[str, int], tuple[list[Hit], float, float]] = MicroBatcher(
            self._embed_search, self.executor, window_s=config.batch_window_ms / 1000, max_batch=config.max_batch)

    async def retrieve(self, question: str, top_k: int, clock: StageClock) -> list[Source]:
        """Top-k sources for a normalised question; stage times go into ``clock``:
        ``embed_wait`` (for the batch to start), ``embed`` and ``search`` (the batch's)
        and ``docload``."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InvalidParameterError("top_k", top_k, "a positive int")
        (hits, embed_ms, search_ms), wait_ms = await self.batcher.submit((question, top_k))
        clock.add("embed_wait", wait_ms)
        clock.add("embed", embed_ms)
        clock.add("search", search_ms)
        with clock.span("docload"):
            chunks = self.docstore.get_many([h.chunk_id for h in hits])
        return [Source(c.doc_id, c.chunk_id, h.score, c.text, c.metadata) for c, h in zip(chunks, hits)]

    def _embed_search(self, items: list[tuple[str, int]]) -> list[tuple[list[Hit], float, float]]:
        """One model call and one FAISS search for a whole micro-batch (on the executor)."""
        t0 = time.perf_counter()
        vectors = self.embedder.encode([q for q, _ in items])
        t1 = time.perf_counter()
        rows = self.index.search(vectors, max(k for _, k in items))
        t2 = time.perf_counter()
        embed_ms, search_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        return [(row[:k], embed_ms, search_ms) for row, (_, k) in zip(rows, items)]

    def stats(self) -> dict[str, Any]:
        b = self.batcher
        return {"batches": b.batches, "queries": b.items, "queued": b.queued,
                "mean_batch": round(b.items / b.batches, 2) if b.batches else 0.0}

    def close(self) -> None:
        if self._owns_executor:
            self.executor.shutdown(wait=True)
        close = getattr(self.docstore, "close", None)
        if close:
            close()
