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

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ragserve.answers import AnswerCache, from_cached
from ragserve.cache import normalize_question
from ragserve.config import RAGConfig
from ragserve.errors import EmptyQuestionError, QuestionTooLongError
from ragserve.manifest import Manifest, check_embedding, verify
from ragserve.runtime import LoopThread
from ragserve.timing import Gauges, StageClock, StageStats
from ragserve.types import DocStore, Embedder, Generator, QueryResult, Source, Timings, VectorIndex


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
        # in_flight: requests past L1 on the engine loop; queued: at the embed worker
        # (waiting for it or being embedded).
        self.gauges = Gauges("in_flight", "queued")
        self._runtime = LoopThread()
        # One worker: the embedding model uses its own intra-op threads, and one model
        # call at a time keeps them from fighting each other.
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragserve-embed")
        self._prompt_builder: Any = None
        self._counts = {"queries": 0, "errors": 0}
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
    ) -> RAG:
        """Open an index folder: verify it against its manifest, map its files, load the
        embedding model and (unless ``start_engine=False``) start the generation engine.

        Raises ``IndexNotFoundError``, ``IndexIntegrityError`` or ``IndexMismatchError``
        before anything is served from a bad index.
        """
        from ragserve.docstore import LazyDocStore
        from ragserve.embed import SentenceTransformerEmbedder
        from ragserve.index import FaissIndex

        config = config or RAGConfig.load()
        manifest = verify(path)
        embedder = SentenceTransformerEmbedder(config.embed)
        check_embedding(manifest, embedder.identity, int(manifest.embedding["dim"]))
        index = FaissIndex.load(manifest.folder, manifest.data["index"]["type"])
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
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    # -- public API ---------------------------------------------------------------------

    def query(self, question: str, *, namespace: str | None = None,
              cache_read: bool = True, cache_write: bool = True) -> QueryResult:
        """Answer one question (blocking). Safe from threads and from inside an event loop.

        An L1 hit is answered in the calling thread, without a hop to the engine loop.
        ``namespace`` overrides ``cache.namespace``; ``cache_read`` / ``cache_write``
        bypass the answer cache for this request.
        """
        hit = self._l1_answer(question, namespace, cache_read)
        if isinstance(hit, QueryResult):
            return hit
        return self._runtime.run(self._answer(hit, read=cache_read, write=cache_write))

    async def aquery(self, question: str, *, namespace: str | None = None,
                     cache_read: bool = True, cache_write: bool = True) -> QueryResult:
        """Answer one question from any event loop."""
        hit = self._l1_answer(question, namespace, cache_read)
        if isinstance(hit, QueryResult):
            return hit
        return await self._runtime.run_async(self._answer(hit, read=cache_read, write=cache_write))

    def query_batch(self, questions: Sequence[str], *, namespace: str | None = None) -> list[QueryResult | Exception]:
        """Answer many questions concurrently; order is kept, a failure stays in its slot."""
        return self._runtime.run(self._answer_many(questions, namespace))

    async def aquery_batch(self, questions: Sequence[str], *,
                           namespace: str | None = None) -> list[QueryResult | Exception]:
        return await self._runtime.run_async(self._answer_many(questions, namespace))

    def retrieve(self, question: str, top_k: int | None = None) -> list[Source]:
        """Retrieval only (no LLM): the top-k sources with scores."""
        question = self._check(question)
        return self._runtime.run(self._retrieve(question, top_k or self.config.query.top_k, StageClock()))

    def stats(self) -> dict[str, Any]:
        """Queries, errors, per-stage latency (count, mean, p50/p95/p99 in ms over the last
        ``window`` queries), the share of queries each cache tier answered, the in-flight
        and queued gauges, and the cache's own counters. Plain JSON-able values:
        ``orjson.dumps(rag.stats())``."""
        return {**self._counts, "window": self.stage_stats.window, "stages": self.stage_stats.summary(),
                "tiers": self.stage_stats.tiers(), "gauges": self.gauges.snapshot(),
                "cache": self.cache.stats() if self.cache else None}

    def close(self) -> None:
        """Stop the engine, flush cache writes, release the index files. Idempotent."""
        if self._runtime.running:
            async def stop() -> None:
                if self.cache is not None:
                    await self.cache.close()
                if self.generator is not None:
                    self.generator.shutdown()

            self._runtime.run(stop())
        self._runtime.stop()
        if self.cache is not None:
            self.cache.stop_server()
        self._cpu.shutdown(wait=True)
        close = getattr(self.docstore, "close", None)
        if close:
            close()

    def __enter__(self) -> RAG:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stages -------------------------------------------------------------------------

    def _check(self, question: str) -> str:
        if not isinstance(question, str) or not question.strip():
            raise EmptyQuestionError()
        question = normalize_question(question)
        limit = self.config.query.max_question_chars
        if len(question) > limit:
            raise QuestionTooLongError(len(question), limit)
        return question

    async def _retrieve(self, question: str, top_k: int, clock: StageClock) -> list[Source]:
        loop = asyncio.get_running_loop()
        # Counted here, not in the worker, so a cancelled wait cannot leave the gauge high.
        with self.gauges.track("queued"):
            vectors, hits = await loop.run_in_executor(
                self._cpu, self._embed_search, question, top_k, clock, time.perf_counter())
        with clock.span("docload"):
            chunks = self.docstore.get_many([h.chunk_id for h in hits])
        return [Source(c.doc_id, c.chunk_id, h.score, c.text, c.metadata) for c, h in zip(chunks, hits)]

    def _embed_search(self, question: str, top_k: int, clock: StageClock,
                      submitted: float) -> tuple[np.ndarray, list[Any]]:
        # The one embed worker serves queries in turn: the time before it reached this one.
        clock.add("embed_wait", (time.perf_counter() - submitted) * 1e3)
        with clock.span("embed"):
            vectors = self.embedder.encode([question])
        with clock.span("search"):
            hits = self.index.search(vectors, top_k)[0]
        return vectors, hits

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

    async def _answer(self, question: str | _Prepared, namespace: str | None = None,
                      read: bool = True, write: bool = True) -> QueryResult:
        self.gauges.inc("in_flight")
        try:
            p = question if isinstance(question, _Prepared) else self._prepare(question, namespace)
            clock = p.clock
            if self.cache is None:
                return self._finish(await self._generate(p.question, clock), clock)
            if read:
                hit, tier = await self.cache.lookup(p.key, clock, l1=not p.l1_done)
                if hit is not None:
                    return self._finish(from_cached(hit, tier, clock), clock)
            shared, _ = await self.cache.flight.run(
                p.key, lambda: self._generate_and_remember(p.key, p.question, write))
            # Identical concurrent callers share one run: each gets its own copy, with the
            # run's stage times and its own total.
            result = dataclasses.replace(shared)
            for stage, ms in result.timings.as_dict().items():  # keep our own cache lookups
                if stage != "total":
                    clock.ms.setdefault(stage, ms)
            return self._finish(result, clock)
        except BaseException:
            self._counts["errors"] += 1
            raise
        finally:
            self.gauges.dec("in_flight")

    async def _generate_and_remember(self, key: str, question: str, write: bool) -> QueryResult:
        result = await self._generate(question, StageClock())
        if write and self.cache is not None:
            self.cache.remember(key, result)  # only a finished, successful answer is stored
        return result

    async def _generate(self, question: str, clock: StageClock) -> QueryResult:
        sources = await self._retrieve(question, self.config.query.top_k, clock)
        generator = self._ensure_generator()
        with clock.span("prompt"):
            prompt = self._builder(generator).build(question, sources)
        with clock.span("generate"):
            gen = await generator.generate(prompt.text, uuid.uuid4().hex)
        clock.add("generate_queue", gen.queue_ms)
        clock.add("generate_first_token", gen.first_token_ms)
        clock.add("generate_decode", gen.decode_ms)
        return QueryResult(
            question=question,
            answer=gen.text,
            sources=prompt.used,
            timings=Timings(**clock.ms),
            cache_tier="miss",
            model=generator.model_name,
            index_fingerprint=self.fingerprint,
            usage=gen.usage,
            finish_reason=gen.finish_reason,
            dropped_sources=prompt.dropped,
        )

    def _finish(self, result: QueryResult, clock: StageClock) -> QueryResult:
        """Stamp the caller's own total, count the query, record its stage times."""
        clock.ms["total"] = clock.elapsed_ms()
        result.timings = Timings(**clock.ms)
        self._counts["queries"] += 1
        self.stage_stats.record(clock.ms, result.cache_tier)
        return result

    async def _answer_many(self, questions: Sequence[str], namespace: str | None = None) -> list[QueryResult | Exception]:
        results = await asyncio.gather(*(self._answer(q, namespace) for q in questions), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r  # cancellation and interrupts are not per-item failures
        return list(results)  # type: ignore[arg-type]

    def _builder(self, generator: Generator) -> Any:
        if self._prompt_builder is None:
            from ragserve.prompt import PromptBuilder

            g = self.config.generate
            self._prompt_builder = PromptBuilder(generator.tokenizer(), g.max_model_len, g.max_tokens)
        return self._prompt_builder
