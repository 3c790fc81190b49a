"""``RAG``: the only place that knows the order of the stages, and owns their timers.

**Usage:**

    from ragserve import RAG
    with RAG.from_index("indexes/pydoc") as rag:
        r = rag.query("How does the with statement work?")
        print(r.answer, r.sources[0].doc_id, r.timings)

``query()`` blocks; ``await aquery()`` works from any event loop; both run on one engine
(see ``runtime.py``). Stages: embed → search → docload → prompt → generate.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ragserve.admission import Admission, Requests
from ragserve.answers import AnswerCache, from_cached, from_generation
from ragserve.cache import normalize_question
from ragserve.config import RAGConfig
from ragserve.errors import EmptyQuestionError, GenerationError, QuestionTooLongError
from ragserve.manifest import Manifest, check_embedding, verify
from ragserve.retrieval import Retriever
from ragserve.runtime import LoopThread, map_bounded
from ragserve.timing import Gauges, StageClock, StageStats
from ragserve.types import (
    DocStore,
    DoneEvent,
    Embedder,
    Generator,
    QueryResult,
    Source,
    SourcesEvent,
    StreamEvent,
    Timings,
    TokenEvent,
    VectorIndex,
)


class _Prepared(NamedTuple):
    question: str
    key: str
    clock: StageClock
    l1_done: bool = False


class RAG:
    """A served index: retrieval over it, and generation grounded in what it retrieves."""

    def __init__(
        self,
        manifest: Manifest,
        index: VectorIndex,
        docstore: DocStore,
        embedder: Embedder,
        generator: Generator | None,
        config: RAGConfig,
    ) -> None:
        self.manifest = manifest
        self.index = index
        self.docstore = docstore
        self.embedder = embedder
        self.generator = generator
        self.config = config
        self.stage_stats = StageStats()
        # in_flight: requests past L1 on the engine loop; queued: waiting for an admission slot.
        self.gauges = Gauges("in_flight", "queued")
        self._runtime = LoopThread()
        self.retriever = Retriever(embedder, index, docstore, config.embed)
        q = config.query
        self.admission = Admission(q.max_in_flight, q.max_queued, self.gauges)
        self._prompt_builder: Any = None
        self.requests = Requests(self.gauges)
        self.cache: AnswerCache | None = None
        if config.cache.enabled:
            self.cache = AnswerCache(config.cache, manifest.fingerprint, config.fingerprint())

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_index(
        cls,
        path: str | Path,
        config: RAGConfig | None = None,
        *,
        start_engine: bool = True,
        embedder: Embedder | None = None,
    ) -> RAG:
        """Open an index folder: verify it against its manifest, map its files, load the
        embedding model and (unless ``start_engine=False``) start the generation engine.

        The index type and its parameters come from the manifest; the query-time search
        settings (``index.ivf_nprobe``, ``index.hnsw_ef_search``) from ``config``, where 0
        keeps the manifest's defaults. ``embedder`` shares an already loaded model (it must
        be the one the index was built with; that is checked).

        Raises ``IndexNotFoundError``, ``IndexIntegrityError`` or ``IndexMismatchError``
        before anything is served from a bad index.
        """
        from ragserve.docstore import LazyDocStore
        from ragserve.index import FaissIndex
        from ragserve.index_spec import IndexSpec

        config = config or RAGConfig.load()
        manifest = verify(path)
        if embedder is None:
            from ragserve.embed import SentenceTransformerEmbedder

            embedder = SentenceTransformerEmbedder(config.embed)
        check_embedding(manifest, embedder.identity, int(manifest.embedding["dim"]))
        index = FaissIndex.load(manifest.folder, IndexSpec.from_manifest(manifest.data["index"]),
                                nprobe=config.index.ivf_nprobe, ef_search=config.index.hnsw_ef_search)
        embedder.warm_up()
        check_embedding(manifest, embedder.identity, embedder.dim)
        docstore = LazyDocStore(manifest.folder)
        rag = cls(manifest, index, docstore, embedder, None, config)
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

    def _ensure_generator(self) -> Generator:
        # Runs on the engine loop: vLLM's AsyncLLM binds to the loop it starts on.
        if self.generator is None:
            from ragserve.generate import VllmGenerator

            self.generator = VllmGenerator(self.config.generate)
        self.generator.warm_up()
        return self.generator

    @property
    def _cpu(self) -> Any:
        """The executor that runs embedding and search (profilers hook into its thread)."""
        return self.retriever.executor

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    # -- public API ---------------------------------------------------------------------

    def query(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
              cache_write: bool = True, timeout_s: float | None = None) -> QueryResult:
        """Answer one question (blocking). Safe from threads and from inside an event loop.

        An L1 hit is answered in the calling thread, without a hop to the engine loop.
        ``namespace`` overrides ``cache.namespace``; ``cache_read`` / ``cache_write``
        bypass the answer cache for this request; ``timeout_s`` overrides
        ``query.timeout_s`` (0: no deadline). Raises ``OverloadedError`` at once when the
        engine is full, ``DeadlineExceededError`` past the deadline.
        """
        hit = self._l1_answer(question, namespace, cache_read)
        if isinstance(hit, QueryResult):
            return hit
        return self._runtime.run(self._answer(hit, read=cache_read, write=cache_write, timeout_s=timeout_s))

    async def aquery(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
                     cache_write: bool = True, timeout_s: float | None = None) -> QueryResult:
        """Answer one question from any event loop. Cancelling the awaiting task aborts the
        request in the engine and caches nothing."""
        hit = self._l1_answer(question, namespace, cache_read)
        if isinstance(hit, QueryResult):
            return hit
        return await self._runtime.run_async(
            self._answer(hit, read=cache_read, write=cache_write, timeout_s=timeout_s))

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
               cache_write: bool = True, timeout_s: float | None = None) -> Iterator[StreamEvent]:
        """Answer one question as a stream (blocking iterator): a ``SourcesEvent`` first,
        then ``TokenEvent`` pieces as they are generated, then a ``DoneEvent`` with the
        result and its timings. Leaving the loop early aborts the generation.

        **Usage:** ``for ev in rag.stream(q): print(getattr(ev, "text", ""), end="")``
        """
        p = self._prepare(question, namespace)
        return self._runtime.iterate(self._stream(p, cache_read, cache_write, timeout_s))

    async def astream(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
                      cache_write: bool = True, timeout_s: float | None = None) -> AsyncIterator[StreamEvent]:
        """``stream`` for any event loop: ``async for ev in rag.astream(q): ...``"""
        p = self._prepare(question, namespace)
        async for event in self._runtime.aiterate(self._stream(p, cache_read, cache_write, timeout_s)):
            yield event

    def retrieve(self, question: str, top_k: int | None = None) -> list[Source]:
        """Retrieval only (no LLM): the top-k sources with scores."""
        question = self._check(question)
        return self._runtime.run(self.retriever.retrieve(question, top_k or self.config.query.top_k, StageClock()))

    async def aretrieve(self, question: str, top_k: int | None = None) -> list[Source]:
        """``retrieve`` from any event loop; concurrent calls share embedding batches."""
        question = self._check(question)
        return await self._runtime.run_async(self.retriever.retrieve(question, top_k or self.config.query.top_k, StageClock()))

    def stats(self) -> dict[str, Any]:
        """Queries, errors, per-stage latency (count, mean, p50/p95/p99 in ms over the last
        ``window`` queries), the share of queries each cache tier answered, the gauges
        (``in_flight``: requests past L1 on the engine loop; ``queued``: waiting for an
        admission slot), admission and embedding-batch counters, and the cache's own
        counters. Plain JSON-able values: ``orjson.dumps(rag.stats())``."""
        unfinished = getattr(self.generator, "unfinished", None)
        return {
            **self.requests.counts,
            "window": self.stage_stats.window,
            "stages": self.stage_stats.summary(),
            "tiers": self.stage_stats.tiers(),
            "gauges": self.gauges.snapshot(),
            "admission": self.admission.as_dict(),
            "embed_batches": self.retriever.stats(),
            "engine_unfinished": unfinished() if unfinished else None,
            "cache": self.cache.stats() if self.cache else None,
        }

    def close(self) -> None:
        """Stop the engine, flush cache writes, release the index files. Idempotent."""
        if self._runtime.running:
            # Requests still running are cancelled (vLLM aborts them); cache writes finish.
            writes = self.cache.l2.tasks if self.cache is not None and self.cache.l2 is not None else set()
            self._runtime.cancel_tasks(keep=lambda t: t in writes)

            async def stop() -> None:
                if self.cache is not None:
                    await self.cache.close()
                if self.generator is not None:
                    self.generator.shutdown()

            self._runtime.run(stop())
        self._runtime.stop()
        if self.cache is not None:
            self.cache.stop_server()
        self.retriever.close()

    def __enter__(self) -> RAG:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stages -------------------------------------------------------------------------

    def _check(self, question: str) -> str:
        from ragserve.validation import check_question  # what a question is: see validation.py

        return check_question(question, self.config.query.max_question_chars)

    def _prepare(self, question: str, namespace: str | None) -> _Prepared:
        """Validate and normalise once; the cache key and the clock travel with the request."""
        clock = StageClock()
        q = self._check(question)
        key = self.cache.key(q, namespace) if self.cache is not None else ""
        return _Prepared(q, key, clock)

    def _l1_answer(self, question: str, namespace: str | None, read: bool) -> QueryResult | _Prepared:
        """The caller-thread fast path: an L1 hit, or the prepared request (L1 already asked)."""
        p = self._prepare(question, namespace)
        if self.cache is None or not read:
            return p
        with p.clock.span("cache_l1"):
            hit = self.cache.l1.get(p.key)
        if hit is None:
            return p._replace(l1_done=True)
        return self._finish(from_cached(hit, "l1", p.clock), p.clock)

    def _deadline(self, timeout_s: float | None) -> float:
        return self.config.query.timeout_s if timeout_s is None else timeout_s

    async def _answer(self, question: str | _Prepared, namespace: str | None = None, read: bool = True,
                      write: bool = True, timeout_s: float | None = None) -> QueryResult:
        async with self.requests.scope(self._deadline(timeout_s)):
            p = question if isinstance(question, _Prepared) else self._prepare(question, namespace)
            return await self._answer_prepared(p, read, write)

    async def _answer_prepared(self, p: _Prepared, read: bool, write: bool) -> QueryResult:
        clock = p.clock
        if self.cache is None:
            return self._finish(await self._generate(p.question, clock), clock)
        if read:
            hit, tier = await self.cache.lookup(p.key, clock, l1=not p.l1_done)
            if hit is not None:
                return self._finish(from_cached(hit, tier, clock), clock)
        # A run that must not write is shared only with callers that don't write either:
        # a writer joining it would otherwise lose its write.
        flight_key = p.key if write else p.key + ":no-write"
        shared, _ = await self.cache.flight.run(
            flight_key, lambda: self._generate_and_remember(p.key, p.question, write))
        # Identical concurrent callers share one run: each gets its own copy, with the
        # run's stage times and its own total.
        result = dataclasses.replace(shared)
        for stage, ms in result.timings.as_dict().items():  # keep our own cache lookups
            if stage != "total" and ms:  # a stage the run never entered is not a 0 ms sample
                clock.ms.setdefault(stage, ms)
        return self._finish(result, clock)

    async def _generate_and_remember(self, key: str, question: str, write: bool) -> QueryResult:
        result = await self._generate(question, StageClock())
        if write and self.cache is not None:
            self.cache.remember(key, result)  # only a finished, successful answer is stored
        return result

    async def _generate(self, question: str, clock: StageClock) -> QueryResult:
        async with self.admission.slot() as waited:
            clock.add("admission", waited())
            generator, prompt = await self._grounded_prompt(question, clock)
            with clock.span("generate"):
                gen = await generator.generate(prompt.text, uuid.uuid4().hex, token_ids=prompt.token_ids)
            return from_generation(question, generator.model_name, prompt, gen, clock, self.fingerprint)

    async def _grounded_prompt(self, question: str, clock: StageClock) -> tuple[Generator, Any]:
        sources = await self.retriever.retrieve(question, self.config.query.top_k, clock)
        generator = self._ensure_generator()
        with clock.span("prompt"):
            prompt = self._builder(generator).build(question, sources)
        return generator, prompt

    async def _stream(self, p: _Prepared, read: bool, write: bool,
                      timeout_s: float | None) -> AsyncIterator[StreamEvent]:
        """The stream on the engine loop: cache hit → one piece; miss → vLLM deltas."""
        clock = p.clock
        async with self.requests.scope(self._deadline(timeout_s)):
            if self.cache is not None and read:
                hit, tier = await self.cache.lookup(p.key, clock)
                if hit is not None:
                    result = self._finish(from_cached(hit, tier, clock), clock)
                    for event in (SourcesEvent(result.sources, tier), TokenEvent(result.answer), DoneEvent(result)):
                        yield event
                    return
            async with self.admission.slot() as waited:
                clock.add("admission", waited())
                generator, prompt = await self._grounded_prompt(p.question, clock)
                yield SourcesEvent(prompt.used, "miss")
                gen = None
                with clock.span("generate"):
                    async for piece in generator.stream(prompt.text, uuid.uuid4().hex, token_ids=prompt.token_ids):
                        if isinstance(piece, str):
                            yield TokenEvent(piece)
                        else:
                            gen = piece
                if gen is None:
                    raise GenerationError("the engine ended the stream without a final output")
                result = from_generation(p.question, generator.model_name, prompt, gen, clock, self.fingerprint)
            if write and self.cache is not None:
                self.cache.remember(p.key, result)  # only once the whole answer is in
            yield DoneEvent(self._finish(result, clock))

    def _finish(self, result: QueryResult, clock: StageClock) -> QueryResult:
        """Stamp the caller's own total, count the query, record its stage times."""
        clock.ms["total"] = clock.elapsed_ms()
        result.timings = Timings(**clock.ms)
        self.requests.counts["queries"] += 1
        self.stage_stats.record(clock.ms, result.cache_tier)
        return result

    async def _answer_many(self, questions: Sequence[str], namespace: str | None = None,
                           timeout_s: float | None = None) -> list[QueryResult | Exception]:
        return await map_bounded(lambda q: self._answer(q, namespace, timeout_s=timeout_s), questions,
                                 self.config.query.max_in_flight)

    def _builder(self, generator: Generator) -> Any:
        if self._prompt_builder is None:
            from ragserve.prompt import PromptBuilder

            g = self.config.generate
            self._prompt_builder = PromptBuilder(generator.tokenizer(), g.max_model_len, g.max_tokens)
        return self._prompt_builder
