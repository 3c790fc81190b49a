"""``RAG``: a served index and its engine, the public API.

**Usage:**

    from ragserve import RAG
    with RAG.from_index("indexes/pydoc") as rag:
        r = rag.query("How does the with statement work?")
        print(r.answer, r.sources[0].doc_id, r.timings)

``query()`` blocks; ``await aquery()`` works from any event loop; both run on one engine
(``engine/core.py``), which ``RAG`` holds rather than is: what it exposes is the verbs
below and the parts a tool reads (``config``, ``cache``, ``generator``, ``observers``, ...),
nothing of the engine's inner state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ragserve.config import LOOPBACK_HOSTS, EmbedConfig, RAGConfig
from ragserve.engine.core import Engine
from ragserve.engine.served import ShardOpener, open_index
from ragserve.index.manifest import Manifest
from ragserve.retrieval.retriever import Retriever
from ragserve.types import DocStore, Embedder, Generator, QueryResult, Sources, StreamEvent, VectorIndex

T = TypeVar("T")


class RAG:
    """A served index: retrieval over it, and generation grounded in what it retrieves."""

    def __init__(self, manifest: Manifest, index: VectorIndex, docstore: DocStore, embedder: Embedder,
                 generator: Generator | None, config: RAGConfig, *, path: Path | None = None,
                 generators: Mapping[str, Generator] | None = None,
                 shards: ShardOpener | None = None) -> None:
        """Serve already opened parts (``from_index`` opens them from a folder and checks
        them; tests and tools pass their own). ``generator=None``: the one
        ``config.generate.backend`` names, started by ``warm_up`` or the first miss.
        ``generators``: for models of ``[models]`` by name (the default model's may also be
        ``generator``); the others are built from their config, sharing a vLLM engine
        where only sampling differs (``generators.make_generators``). ``shards``: where a
        sharded index's vectors are searched (Ray shard actors; None: in this process)."""
        self._engine = Engine(manifest, index, docstore, embedder, generator, config, path,
                              generators=generators, shard_opener=shards)

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
        generators: Mapping[str, Generator] | None = None,
        shards: ShardOpener | None = None,
    ) -> RAG:
        """Open an index folder: verify it against its manifest, map its files, load the
        embedding model and (unless ``start_engine=False``) start the generation engine.

        The index type and its parameters come from the manifest; the query-time search
        settings (``index.ivf_nprobe``, ``index.hnsw_ef_search``) from ``config``, where 0
        keeps the manifest's defaults. ``embedder`` shares an already loaded model (it must
        be the one the index was built with; that is checked). ``generator`` replaces the
        one ``config.generate.backend`` names (``generators.make_generator``) with any
        object of the ``types.Generator`` protocol. ``shards``: where a sharded index's
        vectors are searched, now and after every reload (``engine.served.ShardOpener``;
        ``serve --ray`` passes its shard actors); default: mapped in this process.

        Raises ``IndexNotFoundError``, ``IndexIntegrityError`` or ``IndexMismatchError``
        before anything is served from a bad index.
        """
        config = config or RAGConfig.load()
        if embedder is None:
            from ragserve.retrieval.embed import SentenceTransformerEmbedder

            embedder = SentenceTransformerEmbedder(serving_embed_config(config, generator))
        manifest, index, docstore = open_index(path, config, embedder, shards)
        rag = cls(manifest, index, docstore, embedder, generator, config, path=Path(path),
                  generators=generators, shards=shards)
        if start_engine:
            try:
                rag.warm_up()
            except BaseException:
                rag.close()
                raise
        return rag

    def warm_up(self) -> None:
        """Start the generation engine (every model's) on the engine loop (idempotent)."""
        return self._engine.warm_up()

    @property
    def manifest(self) -> Manifest:
        return self._engine.manifest

    @property
    def index(self) -> VectorIndex:
        return self._engine.index

    @property
    def docstore(self) -> DocStore:
        return self._engine.docstore

    @property
    def retriever(self) -> Retriever:
        return self._engine.retriever

    @property
    def fingerprint(self) -> str:
        return self._engine.fingerprint

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
        return self._engine.reload(path)

    def query(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
              cache_write: bool = True, timeout_s: float | None = None,
              request_id: str | None = None, top_k: int | None = None,
              priority: int = 0, model: str | None = None) -> QueryResult:
        """Answer one question (blocking). Safe from threads and from inside an event loop.

        An L1 hit is answered in the calling thread, without a hop to the engine loop.
        ``namespace`` overrides ``cache.namespace``; ``cache_read`` / ``cache_write``
        bypass the answer cache for this request; ``timeout_s`` overrides
        ``query.timeout_s`` (0: no deadline); ``request_id`` names the request in the
        result and, when it runs generation, in vLLM (a new one by default); ``top_k``
        overrides ``query.top_k`` (answers are cached per top_k); ``priority`` (an int,
        lower runs sooner, default 0) orders the request in ragserve's admission queue and,
        with ``generate.scheduling = "priority"``, in vLLM's scheduler; it is not part of
        the cache key. ``model`` names one of ``[models]`` (default: ``models.default``, or
        the router's pick with ``models.route = "auto"``; "auto" asks for the pick): each
        model has its own cache entries and single-flight runs, and ``result.model`` says
        which answered. Raises ``UnknownModelError`` for a model not configured,
        ``OverloadedError`` at once when the engine is full, ``DeadlineExceededError`` past
        the deadline.
        """
        return self._engine.query(question, namespace=namespace, cache_read=cache_read, cache_write=cache_write, timeout_s=timeout_s, request_id=request_id, top_k=top_k, priority=priority, model=model)

    async def aquery(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
                     cache_write: bool = True, timeout_s: float | None = None,
                     request_id: str | None = None, top_k: int | None = None,
                     priority: int = 0, model: str | None = None) -> QueryResult:
        """Answer one question from any event loop. Cancelling the awaiting task aborts the
        request in the engine and caches nothing."""
        return await self._engine.aquery(question, namespace=namespace, cache_read=cache_read, cache_write=cache_write, timeout_s=timeout_s, request_id=request_id, top_k=top_k, priority=priority, model=model)

    def query_batch(self, questions: Sequence[str], *, namespace: str | None = None,
                    timeout_s: float | None = None, priority: int = 0,
                    model: str | None = None) -> list[QueryResult | Exception]:
        """Answer many questions concurrently; order is kept, a failure stays in its slot.
        At most ``query.max_in_flight`` of them run at once, so a large batch never
        overloads the engine by itself."""
        return self._engine.query_batch(questions, namespace=namespace, timeout_s=timeout_s, priority=priority,
                                        model=model)

    async def aquery_batch(self, questions: Sequence[str], *, namespace: str | None = None,
                           timeout_s: float | None = None,
                           priority: int = 0, model: str | None = None) -> list[QueryResult | Exception]:
        return await self._engine.aquery_batch(questions, namespace=namespace, timeout_s=timeout_s,
                                               priority=priority, model=model)

    def stream(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
               cache_write: bool = True, timeout_s: float | None = None,
               request_id: str | None = None, top_k: int | None = None,
               priority: int = 0, model: str | None = None) -> Iterator[StreamEvent]:
        """Answer one question as a stream (blocking iterator): a ``SourcesEvent`` first,
        then ``TokenEvent`` pieces as they are generated, then a ``DoneEvent`` with the
        result and its timings. Leaving the loop early aborts the generation (unless
        another request shares it). Bad input raises here, before the first event.

        **Usage:** ``for ev in rag.stream(q): print(getattr(ev, "text", ""), end="")``
        """
        return self._engine.stream(question, namespace=namespace, cache_read=cache_read, cache_write=cache_write, timeout_s=timeout_s, request_id=request_id, top_k=top_k, priority=priority, model=model)

    def astream(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
                cache_write: bool = True, timeout_s: float | None = None,
                request_id: str | None = None, top_k: int | None = None,
                priority: int = 0, model: str | None = None) -> AsyncIterator[StreamEvent]:
        """``stream`` for any event loop: ``async for ev in rag.astream(q): ...``

        The iterator (a ``runtime.Relay``) also reads as ``batches()``: the same events in
        lists of those that reached the caller's loop together, never waiting for more
        (a server writes each list at once)."""
        return self._engine.astream(question, namespace=namespace, cache_read=cache_read, cache_write=cache_write, timeout_s=timeout_s, request_id=request_id, top_k=top_k, priority=priority, model=model)

    def retrieve(self, question: str, top_k: int | None = None) -> Sources:
        """Retrieval only (no LLM): the top-k sources with scores (a list; its
        ``missing_shards`` names the shards that did not answer, with ``ray.allow_partial``)."""
        return self._engine.retrieve(question, top_k)

    async def aretrieve(self, question: str, top_k: int | None = None) -> Sources:
        """``retrieve`` from any event loop; concurrent calls share embedding batches."""
        return await self._engine.aretrieve(question, top_k)

    def stats(self) -> dict[str, Any]:
        """Queries, errors, per-stage latency (count, mean, p50/p95/p99 in ms over the last
        ``window`` queries), the share of queries each cache tier answered, the gauges
        (``in_flight``: requests past L1 on the engine loop; ``queued``: waiting for an
        admission slot), admission and embedding-batch counters, and the cache's own
        counters, and the generator's own (vLLM's prefix-cache hit rate, ``["generator"]
        ["prefix_cache"]``, and the requests vLLM finished, ``["generator"]["engine"]``; per
        endpoint for the openai backend; None when it keeps none). Plain JSON-able values:
        ``orjson.dumps(rag.stats())``."""
        return self._engine.stats()

    async def aflush_cache(self) -> None:
        """Wait for the L2 writes scheduled so far (they run in the background, off each
        query's path). After it, every answer generated so far is in L2 or its write is
        counted as failed (``stats()["cache"]["l2"]``); ``ragserve warm`` checks that."""
        return await self._engine.aflush_cache()

    def reset_prefix_cache(self, attempts: int = 50) -> bool:
        """Empty the generation engine's prefix cache (for benchmarks that must start every
        system cold). Retries while finishing requests still hold blocks; False if the
        engine cannot (a backend without a prefix cache) or never could."""
        return self._engine.reset_prefix_cache(attempts)

    def engine_alive(self) -> bool:
        """False once the generation engine has died (a backend that cannot tell: True)."""
        return self._engine.engine_alive()

    def engine_unfinished(self) -> int | None:
        """Requests the generation engine holds right now (None: the backend cannot say)."""
        return self._engine.engine_unfinished()

    def close(self) -> None:
        """Stop the engine, flush cache writes, release the index files. Idempotent."""
        return self._engine.close()

    # -- the parts a tool reads ----------------------------------------------------------

    @property
    def config(self) -> RAGConfig:
        return self._engine.config

    @property
    def embedder(self) -> Embedder:
        return self._engine.embedder

    @property
    def generator(self) -> Generator | None:
        """The generation backend (None until ``warm_up`` or the first miss starts it); with
        ``[models]``, the default model's."""
        return self._engine.generator

    @property
    def models(self) -> Any:
        """The served models (``engine/models.py``): ``names`` (empty without ``[models]``),
        ``default``, ``choose(name)``, ``describe()`` (what ``GET /v1/models`` lists)."""
        return self._engine.models

    @property
    def cache(self) -> Any:
        """The answer tiers (``cache.answers.AnswerCache``: ``l1``, ``l2``), None when off."""
        return self._engine.cache

    @property
    def observers(self) -> Any:
        """Told of every finished or failed request (``observe/observers.py``); ``add`` your own."""
        return self._engine.observers

    @property
    def gauges(self) -> Any:
        """``in_flight`` (requests past L1 on the engine loop) and ``queued`` (waiting for a slot)."""
        return self._engine.gauges

    @property
    def admission(self) -> Any:
        """The bounds of pipeline runs (``engine/admission.py``): ``max_in_flight``, ``max_queued``."""
        return self._engine.admission

    @property
    def retrievals(self) -> Any:
        """The bounds of retrieval-only requests, apart from the pipeline runs'."""
        return self._engine.retrievals

    @property
    def served(self) -> Any:
        """The index versions (``engine/served.py``): ``current``, and the one each request holds."""
        return self._engine.served

    # -- for tools: benchmarks, profilers, tests ---------------------------------------

    def call(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the engine loop (where the generator and the cache tiers live) and
        return its result: for tools that drive a stage directly, e.g.
        ``rag.call(rag.generator.generate(text, "id"))``."""
        return self._engine.call(work)

    async def acall(self, work: Coroutine[Any, Any, T]) -> T:
        """``call`` from any event loop."""
        return await self._engine.acall(work)

    def flush_cache(self) -> None:
        """``aflush_cache`` for blocking callers."""
        self._engine.flush_cache()

    def prompt_builder(self) -> Any:
        """The ``generators.prompt.PromptBuilder`` of the miss path (starts the generator,
        whose tokenizer it counts with): ``rag.prompt_builder().build(question, sources)``."""
        return self._engine.prompt_builder()

    def run_in_threads(self, fn: Callable[[str], None], timeout_s: float = 30.0) -> None:
        """Call ``fn(thread_name)`` once in each thread that runs stages (the engine loop,
        the embedding worker), e.g. to enable a profiler there: cProfile sees one thread."""
        self._engine.run_in_threads(fn, timeout_s)

    def __enter__(self) -> RAG:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serving_embed_config(config: RAGConfig, generator: Generator | None) -> EmbedConfig:
    """``embed.threads = 0`` (auto) is 1 in a process whose vLLM engine runs on the same
    machine (the vllm backend, or the openai backend on a loopback URL): the engine's OpenMP
    threads hold the cores, and a multi-threaded query embedding beside them spin-waits
    against them. Measured here (``benchmarks/bench_headline.py``, 1,000 requests, 32 clients):
    26.7 req/s with one thread against 20.1 with torch's default, and the serving process's
    CPU 4.7 s against 19.6 s. Index builds keep torch's default."""
    e = config.embed
    g = config.generate
    local = g.backend == "vllm" or (g.backend == "openai" and any(
        urlsplit(u).hostname in LOOPBACK_HOSTS for u in config.openai.urls))
    if e.threads == 0 and generator is None and local:
        return dataclasses.replace(e, threads=1)
    return e

