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
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

from ragserve.admission import Admission, Requests
from ragserve.answers import AnswerCache, from_cached, from_generation
from ragserve.config import RAGConfig
from ragserve.errors import GenerationError, InputError, InvalidParameterError
from ragserve.flight import StreamFlight
from ragserve.manifest import Manifest
from ragserve.observe import Observers
from ragserve.retrieval import Retriever
from ragserve.runtime import LoopThread, map_bounded
from ragserve.served import ServedIndex, Snapshots, describe, open_index, open_served
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
from ragserve.validation import check_namespace, check_question


@dataclasses.dataclass(slots=True)
class _Prepared:
    """One request, validated: what every later step of it needs."""

    question: str
    key: str
    clock: StageClock
    request_id: str
    read: bool
    write: bool
    deadline_s: float
    top_k: int
    namespace: str | None
    snapshot: ServedIndex
    """The index version this request reads: the current one when prepared (the key is
    built from its fingerprint), held from the moment the request starts on the engine
    loop to its end (``_holding``)."""
    l1_done: bool = False
    """Set once the caller's thread asked L1, so a miss is counted there once."""


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
        self.embedder = embedder
        self.generator = generator
        self.config = config
        self.stage_stats = StageStats()
        self.observers = Observers(self.stage_stats)
        """Told of every finished or failed request (``observe.py``); ``add`` your own."""
        # in_flight: requests past L1 on the engine loop; queued: waiting for an admission slot.
        self.gauges = Gauges("in_flight", "queued")
        self._runtime = LoopThread()
        # One thread runs every snapshot's embedding and search: one model call at a time.
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragserve-embed")
        self.served = Snapshots(ServedIndex(manifest, index, docstore,
                                            Retriever(embedder, index, docstore, config.embed, self._cpu)))
        """The current index version; each request keeps the one it started with (``served.py``)."""
        self._path: Path | None = None  # where from_index opened it: what reload() opens again
        self._reload_lock = threading.Lock()
        q = config.query
        self.admission = Admission(q.max_in_flight, q.max_queued, self.gauges)
        self._prompt_builder: Any = None
        self.requests = Requests(self.gauges, self.observers)
        self.flight = StreamFlight()
        self.cache: AnswerCache | None = None
        if config.cache.enabled:
            self.cache = AnswerCache(config.cache, config.fingerprint())

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
        default vLLM generator with any object of the ``types.Generator`` protocol.

        Raises ``IndexNotFoundError``, ``IndexIntegrityError`` or ``IndexMismatchError``
        before anything is served from a bad index.
        """
        config = config or RAGConfig.load()
        if embedder is None:
            from ragserve.embed import SentenceTransformerEmbedder

            embedder = SentenceTransformerEmbedder(config.embed)
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

    def _ensure_generator(self) -> Generator:
        # Runs on the engine loop: vLLM's AsyncLLM binds to the loop it starts on.
        if self.generator is None:
            from ragserve.generate import VllmGenerator

            self.generator = VllmGenerator(self.config.generate)
        self.generator.warm_up()
        return self.generator

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
        """``stream`` for any event loop: ``async for ev in rag.astream(q): ...``"""
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
        counters. Plain JSON-able values: ``orjson.dumps(rag.stats())``."""
        return {
            **self.requests.counts,
            "window": self.stage_stats.window,
            "stages": self.stage_stats.summary(),
            "tiers": self.stage_stats.tiers(),
            "gauges": self.gauges.snapshot(),
            "admission": self.admission.as_dict(),
            "embed_batches": self.retriever.stats(),
            "engine_unfinished": self.engine_unfinished(),
            "single_flight": {"runs": self.flight.runs, "shared": self.flight.shared, "running": len(self.flight)},
            "cache": self.cache.stats() if self.cache else None,
        }

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
                if self.generator is not None:
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

    # -- stages -------------------------------------------------------------------------

    def _check(self, question: str) -> str:
        return check_question(question, self.config.query.max_question_chars)

    def _prepare(self, question: str, namespace: str | None, read: bool, write: bool,
                 timeout_s: float | None, request_id: str | None, top_k: int | None = None) -> _Prepared:
        """Validate and normalise once; the key, the clock and the options travel with it."""
        clock = StageClock()
        default_k = self.config.query.top_k
        snap = self.served.current  # held only once the request starts (_holding)
        try:
            q = self._check(question)
            if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 100):
                raise InvalidParameterError("top_k", top_k, "an int in 1..100")
            if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool)
                                          or not 0 <= timeout_s < float("inf")):
                raise InvalidParameterError("timeout_s", timeout_s, "a number of seconds >= 0 (0: no deadline)")
            if namespace is not None:
                check_namespace(namespace)
            k = default_k if top_k is None else top_k
            key = (self.cache.key(q, namespace, snap.fingerprint, None if k == default_k else k)
                   if self.cache is not None else "")
        except InputError as e:
            self.requests.refused(e)
            raise
        deadline = self.config.query.timeout_s if timeout_s is None else timeout_s
        return _Prepared(q, key, clock, request_id or uuid.uuid4().hex, read, write, deadline, k, namespace, snap)

    def _key(self, p: _Prepared, snap: ServedIndex) -> str:
        if self.cache is None:
            return ""
        default_k = self.config.query.top_k
        return self.cache.key(p.question, p.namespace, snap.fingerprint, None if p.top_k == default_k else p.top_k)

    @asynccontextmanager
    async def _holding(self, p: _Prepared) -> AsyncIterator[None]:
        """Hold the current index version for the whole request. A reload since the request
        was prepared moves it to the new version, and its key with it: the key always
        names the index the request reads."""
        snap = self.served.acquire()
        try:
            if snap is not p.snapshot:
                p.snapshot, p.key, p.l1_done = snap, self._key(p, snap), False
            yield
        finally:
            self.served.release(snap)

    def _l1_hit(self, p: _Prepared) -> QueryResult | None:
        """The caller-thread fast path: an L1 hit, or None (and L1 is marked as asked)."""
        if self.cache is None or not p.read:
            return None
        with p.clock.span("cache_l1"):
            hit = self.cache.l1.get(p.key)
        if hit is None:
            p.l1_done = True
            return None
        return self._finish(from_cached(hit, "l1", p.clock), p)

    async def _answer(self, p: _Prepared) -> QueryResult:
        """Not streaming is consuming the stream and keeping its result (as in vLLM)."""
        async with self._holding(p), self.requests.scope(p.deadline_s):
            async with aclosing(self._events(p, deltas=False)) as events:
                async for event in events:
                    if isinstance(event, DoneEvent):
                        return event.result
        raise GenerationError("the request ended without a result")

    async def _stream(self, p: _Prepared) -> AsyncIterator[StreamEvent]:
        async with self._holding(p), self.requests.scope(p.deadline_s):
            async with aclosing(self._events(p, deltas=True)) as events:
                async for event in events:
                    yield event

    async def _events(self, p: _Prepared, deltas: bool) -> AsyncIterator[StreamEvent]:
        """The one path of a request on the engine loop: the cache tiers, then a run of the
        miss path, shared with identical concurrent requests (``flight.py``)."""
        clock = p.clock
        if self.cache is not None and p.read:
            hit, tier = await self.cache.lookup(p.key, clock, l1=not p.l1_done)
            if hit is not None:
                result = self._finish(from_cached(hit, tier, clock), p)
                for event in (SourcesEvent(result.sources, tier), TokenEvent(result.answer), DoneEvent(result)):
                    yield event
                return
        led: list[bool] = []  # filled by the factory, which only the run's leader calls

        def start() -> AsyncIterator[StreamEvent]:
            led.append(True)
            return self._run(p, p.write and self.cache is not None, deltas)

        run = start() if self.cache is None else self.flight.subscribe(self._flight_key(p, deltas), start)
        async with aclosing(run) as events:
            async for event in events:
                if isinstance(event, DoneEvent):
                    event = DoneEvent(self._finish(_own_copy(event.result, clock, shared=not led), p))
                yield event

    def _flight_key(self, p: _Prepared, deltas: bool) -> str:
        """Which requests may share a run: a run that must not write only with callers that
        don't write either (a writer joining it would lose its write); a stream only a run
        that streams (else its first token would come with the last); a plain query any."""
        key = p.key if p.write else p.key + ":no-write"
        streaming = key + ":deltas"
        return streaming if deltas or streaming in self.flight else key

    async def _run(self, leader: _Prepared, write: bool, deltas: bool) -> AsyncIterator[StreamEvent]:
        """The miss path, run once for every request that shares it: admission →
        retrieve → prompt → generate → remember. ``deltas``: yield the answer as vLLM
        produces it; else vLLM sends only the final output and it comes as one piece."""
        clock, question, snap = StageClock(), leader.question, leader.snapshot
        # The run holds its index version itself: followers may outlive the leader.
        async with self.served.holding(snap), self.admission.slot() as waited:
            clock.add("admission", waited())
            sources = await snap.retriever.retrieve(question, leader.top_k, clock)
            generator = self._ensure_generator()
            with clock.span("prompt"):
                prompt = self._builder(generator).build(question, sources)
            yield SourcesEvent(prompt.used, "miss")
            gen = None
            with clock.span("generate"):
                async for piece in generator.stream(prompt.text, leader.request_id, token_ids=prompt.token_ids,
                                                    deltas=deltas):
                    if not isinstance(piece, str):
                        gen = piece
                    elif deltas:
                        yield TokenEvent(piece)
            if gen is None:
                raise GenerationError("the engine ended the stream without a final output")
            if not deltas:
                yield TokenEvent(gen.text)
            result = from_generation(question, generator.model_name, prompt, gen, clock, snap.fingerprint)
            result.request_id = leader.request_id
            self.observers.generation(result)  # counted once per run, whoever still waits for it
        if write and self.cache is not None:
            self.cache.remember(leader.key, result)  # only a whole, successful answer is stored
        yield DoneEvent(result)

    def _finish(self, result: QueryResult, p: _Prepared) -> QueryResult:
        """Stamp the caller's own total and request id, count the query, tell the observers."""
        clock = p.clock
        clock.ms["total"] = clock.elapsed_ms()
        result.timings = Timings(**clock.ms)
        result.request_id = p.request_id
        self.requests.answered()
        self.observers.result(result, clock.ms)
        return result

    async def _answer_many(self, questions: Sequence[str], namespace: str | None = None,
                           timeout_s: float | None = None) -> list[QueryResult | Exception]:
        async def one(question: str) -> QueryResult:
            return await self._answer(self._prepare(question, namespace, True, True, timeout_s, None))

        return await map_bounded(one, questions, self.config.query.max_in_flight)

    def _builder(self, generator: Generator) -> Any:
        if self._prompt_builder is None:
            from ragserve.prompt import PromptBuilder

            g = self.config.generate
            self._prompt_builder = PromptBuilder(generator.tokenizer(), g.max_model_len, g.max_tokens)
        return self._prompt_builder


def _own_copy(run: QueryResult, clock: StageClock, shared: bool) -> QueryResult:
    """Each request sharing a run gets its own copy of the run's result: the run's stage
    times under its own cache lookups, and (stamped by ``_finish``) its own total; ``shared``
    when another request started the run."""
    result = dataclasses.replace(run, shared=shared)
    for stage, ms in run.timings.as_dict().items():
        if stage != "total" and ms:  # a stage the run never entered is not a 0 ms sample
            clock.ms.setdefault(stage, ms)
    return result
