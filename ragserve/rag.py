"""``RAG``: a served index and its engine, the public API over the pipeline.

**Usage:**

    from ragserve import RAG
    with RAG.from_index("indexes/pydoc") as rag:
        r = rag.query("How does the with statement work?")
        print(r.answer, r.sources[0].doc_id, r.timings)

``query()`` blocks; ``await aquery()`` works from any event loop; both run on one engine
(see ``runtime.py``). The order of the stages is ``pipeline.py``'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any

from ragserve.admission import deadline
from ragserve.config import LOOPBACK_HOSTS, EmbedConfig, RAGConfig
from ragserve.errors import InputError
from ragserve.manifest import Manifest
from ragserve.pipeline import Pipeline
from ragserve.retrieval import Retriever
from ragserve.served import describe, open_index, open_served
from ragserve.timing import StageClock
from ragserve.types import DocStore, Embedder, Generator, QueryResult, Source, StreamEvent, VectorIndex


class RAG(Pipeline):
    """A served index: retrieval over it, and generation grounded in what it retrieves."""

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_index(
        cls,
        path: str | Path,
        config: RAGConfig | None = None,
        *,
        start_engine: bool = True,
        embedder: Embedder | None = None,
        generator: Generator | None = None,
    ) -> RAG:
        """Open an index folder: verify it against its manifest, map its files, load the
        embedding model and (unless ``start_engine=False``) start the generation engine.

        The index type and its parameters come from the manifest; the query-time search
        settings (``index.ivf_nprobe``, ``index.hnsw_ef_search``) from ``config``, where 0
        keeps the manifest's defaults. ``embedder`` shares an already loaded model (it must
        be the one the index was built with; that is checked). ``generator`` replaces the
        one ``config.generate.backend`` names (``generators.make_generator``) with any
        object of the ``types.Generator`` protocol.

        Raises ``IndexNotFoundError``, ``IndexIntegrityError`` or ``IndexMismatchError``
        before anything is served from a bad index.
        """
        config = config or RAGConfig.load()
        if embedder is None:
            from ragserve.embed import SentenceTransformerEmbedder

            embedder = SentenceTransformerEmbedder(serving_embed_config(config, generator))
        manifest, index, docstore = open_index(path, config, embedder)
        rag = cls(manifest, index, docstore, embedder, generator, config)
        rag._path = Path(path)
        if start_engine:
            try:
                rag.warm_up()
            except BaseException:
                rag.close()
                raise
        return rag

    def warm_up(self) -> None:
        """Start the generation engine on the engine loop (idempotent)."""

        async def start() -> None:
            self._ensure_generator()

        self._runtime.run(start())

    # The current snapshot's parts (a request in flight may still use an older one).
    @property
    def manifest(self) -> Manifest:
        return self.served.current.manifest

    @property
    def index(self) -> VectorIndex:
        return self.served.current.index

    @property
    def docstore(self) -> DocStore:
        return self.served.current.docstore

    @property
    def retriever(self) -> Retriever:
        return self.served.current.retriever

    @property
    def fingerprint(self) -> str:
        return self.served.current.fingerprint

    def reload(self, path: str | Path | None = None) -> dict[str, Any]:
        """Open the index at ``path`` (default: the path this engine was opened from, which
        a build flips to its new version), verify it, and swap it in atomically: requests
        already running finish on the index they started with, new ones use the new one,
        and the old files are released when the last request using them ends. Cache keys
        carry the fingerprint, so no answer from the old index is served after the swap.

        A missing, corrupt or half-written index raises (``IndexIntegrityError``, ...)
        and the current one keeps serving. Returns ``{"changed", "fingerprint",
        "previous", "folder", ...}``; the same fingerprint again changes nothing.
        """
        target = Path(path) if path is not None else self._path
        if target is None:
            raise InputError("reload needs a path: this engine was not opened with RAG.from_index")
        with self._reload_lock:  # one reload at a time; requests are never blocked by it
            new = open_served(target, self.config, self.embedder, self._cpu)
            previous = self.served.current
            if new.fingerprint == previous.fingerprint:
                new.close()
                return {"changed": False, "previous": previous.fingerprint, **describe(previous)}
            self.served.swap(new)
            self._path = target
        return {"changed": True, "previous": previous.fingerprint, **describe(new)}

    # -- public API ---------------------------------------------------------------------

    def query(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
              cache_write: bool = True, timeout_s: float | None = None,
              request_id: str | None = None, top_k: int | None = None) -> QueryResult:
        """Answer one question (blocking). Safe from threads and from inside an event loop.

        An L1 hit is answered in the calling thread, without a hop to the engine loop.
        ``namespace`` overrides ``cache.namespace``; ``cache_read`` / ``cache_write``
        bypass the answer cache for this request; ``timeout_s`` overrides
        ``query.timeout_s`` (0: no deadline); ``request_id`` names the request in the
        result and, when it runs generation, in vLLM (a new one by default); ``top_k``
        overrides ``query.top_k`` (answers are cached per top_k). Raises
        ``OverloadedError`` at once when the engine is full, ``DeadlineExceededError``
        past the deadline.
        """
        p = self._prepare(question, namespace, cache_read, cache_write, timeout_s, request_id, top_k)
        return self._l1_hit(p) or self._runtime.run(self._answer(p))

    async def aquery(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
                     cache_write: bool = True, timeout_s: float | None = None,
                     request_id: str | None = None, top_k: int | None = None) -> QueryResult:
        """Answer one question from any event loop. Cancelling the awaiting task aborts the
        request in the engine and caches nothing."""
        p = self._prepare(question, namespace, cache_read, cache_write, timeout_s, request_id, top_k)
        return self._l1_hit(p) or await self._runtime.run_async(self._answer(p))

    def query_batch(self, questions: Sequence[str], *, namespace: str | None = None,
                    timeout_s: float | None = None) -> list[QueryResult | Exception]:
        """Answer many questions concurrently; order is kept, a failure stays in its slot.
        At most ``query.max_in_flight`` of them run at once, so a large batch never
        overloads the engine by itself."""
        return self._runtime.run(self._answer_many(questions, namespace, timeout_s))

    async def aquery_batch(self, questions: Sequence[str], *, namespace: str | None = None,
                           timeout_s: float | None = None) -> list[QueryResult | Exception]:
        return await self._runtime.run_async(self._answer_many(questions, namespace, timeout_s))

    def stream(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
               cache_write: bool = True, timeout_s: float | None = None,
               request_id: str | None = None, top_k: int | None = None) -> Iterator[StreamEvent]:
        """Answer one question as a stream (blocking iterator): a ``SourcesEvent`` first,
        then ``TokenEvent`` pieces as they are generated, then a ``DoneEvent`` with the
        result and its timings. Leaving the loop early aborts the generation (unless
        another request shares it). Bad input raises here, before the first event.

        **Usage:** ``for ev in rag.stream(q): print(getattr(ev, "text", ""), end="")``
        """
        p = self._prepare(question, namespace, cache_read, cache_write, timeout_s, request_id, top_k)
        return self._runtime.iterate(self._stream(p))

    def astream(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
                cache_write: bool = True, timeout_s: float | None = None,
                request_id: str | None = None, top_k: int | None = None) -> AsyncIterator[StreamEvent]:
        """``stream`` for any event loop: ``async for ev in rag.astream(q): ...``

        The iterator (a ``runtime.Relay``) also reads as ``batches()``: the same events in
        lists of those that reached the caller's loop together, never waiting for more
        (a server writes each list at once)."""
        p = self._prepare(question, namespace, cache_read, cache_write, timeout_s, request_id, top_k)
        return self._runtime.aiterate(self._stream(p))

    def retrieve(self, question: str, top_k: int | None = None) -> list[Source]:
        """Retrieval only (no LLM): the top-k sources with scores."""
        question = self._check(question)
        return self._runtime.run(self._retrieve(question, top_k or self.config.query.top_k))

    async def aretrieve(self, question: str, top_k: int | None = None) -> list[Source]:
        """``retrieve`` from any event loop; concurrent calls share embedding batches."""
        question = self._check(question)
        return await self._runtime.run_async(self._retrieve(question, top_k or self.config.query.top_k))

    async def _retrieve(self, question: str, top_k: int) -> list[Source]:
        """Within ``retrievals``' bounds (else ``OverloadedError``) and ``query.timeout_s``."""
        async with self.retrievals.slot(), deadline(self.config.query.timeout_s):
            snap = self.served.acquire()
            try:
                return await snap.retriever.retrieve(question, top_k, StageClock())
            finally:
                self.served.release(snap)

    def stats(self) -> dict[str, Any]:
        """Queries, errors, per-stage latency (count, mean, p50/p95/p99 in ms over the last
        ``window`` queries), the share of queries each cache tier answered, the gauges
        (``in_flight``: requests past L1 on the engine loop; ``queued``: waiting for an
        admission slot), admission and embedding-batch counters, and the cache's own
        counters, and the generator's own (vLLM's prefix-cache hit rate, ``["generator"]
        ["prefix_cache"]``, and the requests vLLM finished, ``["generator"]["engine"]``; per
        endpoint for the openai backend; None when it keeps none). Plain JSON-able values:
        ``orjson.dumps(rag.stats())``."""
        generator_stats = getattr(self.generator, "stats", None)
        return {
            **self.requests.counts,
            "window": self.stage_stats.window,
            "stages": self.stage_stats.summary(),
            "tiers": self.stage_stats.tiers(),
            "gauges": self.gauges.snapshot(),
            "admission": self.admission.as_dict(),
            "retrievals": self.retrievals.as_dict(),
            "embed_batches": self.retriever.stats(),
            "engine_unfinished": self.engine_unfinished(),
            "generator": generator_stats() if generator_stats else None,
            "single_flight": {"runs": self.flight.runs, "shared": self.flight.shared, "running": len(self.flight)},
            "cache": self.cache.stats() if self.cache else None,
        }

    async def aflush_cache(self) -> None:
        """Wait for the L2 writes scheduled so far (they run in the background, off each
        query's path). After it, every answer generated so far is in L2 or its write is
        counted as failed (``stats()["cache"]["l2"]``); ``ragserve warm`` checks that."""
        if self.cache is not None and self.cache.l2 is not None:
            await self._runtime.run_async(self.cache.l2.drain())

    def reset_prefix_cache(self, attempts: int = 50) -> bool:
        """Empty the generation engine's prefix cache (for benchmarks that must start every
        system cold). Retries while finishing requests still hold blocks; False if the
        engine cannot (a backend without a prefix cache) or never could."""
        reset = getattr(self.generator, "reset_prefix_cache", None)
        if reset is None:
            return False

        async def run() -> bool:
            for _ in range(attempts):
                if await reset():
                    return True
                await asyncio.sleep(0.1)
            return False

        return self._runtime.run(run())

    def engine_alive(self) -> bool:
        """False once the generation engine has died (a backend that cannot tell: True)."""
        alive = getattr(self.generator, "alive", None)
        return self.generator is not None and (alive() if alive else True)

    def engine_unfinished(self) -> int | None:
        """Requests the generation engine holds right now (None: the backend cannot say)."""
        unfinished = getattr(self.generator, "unfinished", None)
        return unfinished() if unfinished else None

    def close(self) -> None:
        """Stop the engine, flush cache writes, release the index files. Idempotent."""
        if self._runtime.running:
            # Requests still running are cancelled (vLLM aborts them); cache writes finish.
            writes = self.cache.l2.tasks if self.cache is not None and self.cache.l2 is not None else set()
            self._runtime.cancel_tasks(keep=lambda t: t in writes)

            async def stop() -> None:
                if self.cache is not None:
                    await self.cache.close()
                aclose = getattr(self.generator, "aclose", None)  # an async backend closes politely
                if aclose is not None:
                    await aclose()
                elif self.generator is not None:
                    self.generator.shutdown()

            self._runtime.run(stop())
        self._runtime.stop()
        if self.cache is not None:
            self.cache.stop_server()
        self.served.close()
        self._cpu.shutdown(wait=True)

    def __enter__(self) -> RAG:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serving_embed_config(config: RAGConfig, generator: Generator | None) -> EmbedConfig:
    """``embed.threads = 0`` (auto) is 1 in a process whose vLLM engine runs on the same
    machine (the vllm backend, or the openai backend on a loopback URL): the engine's OpenMP
    threads hold the cores, and a multi-threaded query embedding beside them spin-waits
    against them. Measured here (``scripts/bench_headline.py``, 1,000 requests, 32 clients):
    26.7 req/s with one thread against 20.1 with torch's default, and the serving process's
    CPU 4.7 s against 19.6 s. Index builds keep torch's default."""
    e = config.embed
    g = config.generate
    local = g.backend == "vllm" or (g.backend == "openai" and any(
        urlsplit(u).hostname in LOOPBACK_HOSTS for u in config.openai.urls))
    if e.threads == 0 and generator is None and local:
        return dataclasses.replace(e, threads=1)
    return e

