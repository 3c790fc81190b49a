"""``Pipeline``: the only place that knows the order of the stages, and owns their timers.

One request goes: validate and key (``_prepare``) → L1 on the caller's thread
(``_l1_hit``) → on the engine loop, hold an index version (``_holding``) → L2 → a run of
the miss path shared through single-flight (``_events``): admission → embed → search →
docload → prompt → generate → remember (``_run``) → its own copy of the result, counted
and told to the observers (``_finish``). Not streaming is consuming the stream.

The verbs over it (``query``, ``stream``, ``reload``, ``stats``, ...) are ``Engine``'s in
``core.py``; ``ragserve.RAG`` holds an ``Engine`` and is the public face.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

from ragserve.cache.answers import AnswerCache, from_cached, from_generation
from ragserve.config import RAGConfig, SemanticConfig
from ragserve.engine.admission import Admission, Requests, Ticket
from ragserve.engine.flight import StreamFlight
from ragserve.engine.models import Model, Models, Routed
from ragserve.engine.runtime import LoopThread, map_bounded
from ragserve.engine.served import ServedIndex, ShardOpener, Snapshots
from ragserve.engine.validation import check_options, check_priority, check_question
from ragserve.errors import ConfigError, GenerationError, InputError
from ragserve.index.manifest import Manifest
from ragserve.observe.observers import Observers
from ragserve.observe.timing import Gauges, StageClock, StageStats
from ragserve.retrieval.retriever import Retriever
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

EMBED_THREAD = "ragserve-embed"
"""The name of the one thread that runs every snapshot's embedding and search."""


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
    vector: Any = None
    """The question's vector once the semantic tier embedded it: retrieval reuses it."""
    priority: int = 0
    """Lower runs sooner: in ragserve's admission queue and (``generate.scheduling =
    "priority"``) in vLLM's. Not part of the key: every priority reads the same answers."""
    model: Model | Routed | None = None
    """The model that answers (``models.py``), or the router that picks it after retrieval;
    its fingerprint is part of the key."""


class Pipeline:
    """The stages of a served index in order; ``core.Engine`` adds the verbs."""

    def __init__(
        self,
        manifest: Manifest,
        index: VectorIndex,
        docstore: DocStore,
        embedder: Embedder,
        generator: Generator | None,
        config: RAGConfig,
        path: Path | None = None,
        generators: Mapping[str, Generator] | None = None,
        shard_opener: ShardOpener | None = None,
    ) -> None:
        self.embedder = embedder
        self.config = config
        self.models = Models(config, generator, generators)
        """The served models (``[models]``; one unnamed model without it): ``models.py``."""
        self.stage_stats = StageStats()
        self.observers = Observers(self.stage_stats)
        """Told of every finished or failed request (``observe/observers.py``); ``add`` your own."""
        # in_flight: requests past L1 on the engine loop; queued: waiting for an admission slot.
        self.gauges = Gauges("in_flight", "queued")
        self._runtime = LoopThread()
        # One thread runs every snapshot's embedding and search: one model call at a time.
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix=EMBED_THREAD)
        self.served = Snapshots(ServedIndex(manifest, index, docstore,
                                            Retriever(embedder, index, docstore, config.embed, self._cpu)))
        """The current index version; each request keeps the one it started with (``served.py``)."""
        self.path = path
        """Where ``RAG.from_index`` opened the index: what ``reload()`` opens again."""
        self.shard_opener = shard_opener
        """Where a reload opens a sharded index's vectors (``served.ShardOpener``; None: here)."""
        self._reload_lock = threading.Lock()
        q = config.query
        self.admission = Admission(q.max_in_flight, q.max_queued, self.gauges, reserved=q.reserved_in_flight,
                                   urgent_priority=q.urgent_priority)
        self.retrievals = Admission(q.max_in_flight, q.max_queued)
        """Retrieval-only requests (``retrieve``), bounded apart from the generation slots: a
        flood of them is refused (429) instead of queueing without end for the embedder, and
        none waits behind generations."""
        self.requests = Requests(self.gauges, self.observers)
        self.flight = StreamFlight()
        self.cache: AnswerCache | None = None
        if config.cache.enabled:
            self.cache = AnswerCache(config.cache, config.fingerprint(), config.semantic)
            check_semantic_model(config.semantic, embedder)

    @property
    def generator(self) -> Generator | None:
        """The default model's generator (None until started)."""
        return self.models.default.generator

    def _ensure_generator(self, model: Model | None = None) -> Generator:
        # Runs on the engine loop: a generator may bind to the loop it starts on (vLLM's
        # AsyncLLM does; an HTTP client's connections do).
        return self.models.ensure(model or self.models.default)

    # -- stages -------------------------------------------------------------------------

    def _check(self, question: str) -> str:
        return check_question(question, self.config.query.max_question_chars)

    def _prepare(self, question: str, namespace: str | None, read: bool, write: bool,
                 timeout_s: float | None, request_id: str | None, top_k: int | None = None,
                 priority: int = 0, model: str | None = None) -> _Prepared:
        """Validate and normalise once; the key, the clock and the options travel with it."""
        clock = StageClock()
        default_k = self.config.query.top_k
        snap = self.served.current  # held only once the request starts (_holding)
        try:
            q = self._check(question)
            check_options(namespace=namespace, top_k=top_k, timeout_s=timeout_s)
            check_priority(priority)
            chosen = self.models.choose(model)
            k = default_k if top_k is None else top_k
            key = (self.cache.key(q, namespace, snap.fingerprint, self._keyed_k(k), chosen.fingerprint)
                   if self.cache is not None else "")
        except InputError as e:
            self.requests.refused(e)
            raise
        deadline = self.config.query.timeout_s if timeout_s is None else timeout_s
        rid = request_id or _new_request_id()
        return _Prepared(q, key, clock, rid, read, write, deadline, k, namespace, snap, priority=priority,
                         model=chosen)

    def _key(self, p: _Prepared, snap: ServedIndex, model: Model | Routed | None = None) -> str:
        """``p``'s key over ``snap``, for its own model or ``model`` (a routed run's pick)."""
        if self.cache is None:
            return ""
        m = model or p.model
        return self.cache.key(p.question, p.namespace, snap.fingerprint, self._keyed_k(p.top_k),
                              m.fingerprint if m is not None else None)

    def _keyed_k(self, k: int) -> int | None:
        """``top_k`` as the cache keys and partitions name it: None for the configured one,
        so a request that asks for the default shares its answers with one that does not ask."""
        return None if k == self.config.query.top_k else k

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
        return self._finish(from_cached(hit, "l1"), p)

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
        hit, tier = None, "miss"
        if self.cache is not None and p.read:
            hit, tier = await self.cache.lookup(p.key, clock, l1=not p.l1_done)
            if hit is None and self.cache.semantic is not None and self._flight_key(p, deltas) not in self.flight:
                result = await self._semantic_hit(p)
                if result is not None:
                    for event in (SourcesEvent(result.sources, "semantic"), TokenEvent(result.answer),
                                  DoneEvent(result)):
                        yield event
                    return
            if hit is None:
                # The lookup awaited (the hop to this loop, Redis): a run of this question may
                # have ended meanwhile, its answer now in L1 (its flight may still be winding
                # down). Look again with no await between this look and starting or joining a
                # run: no question is generated again once its answer is cached, and an
                # answer already cached is served as the hit it is.
                with clock.span("cache_l1"):
                    hit, tier = self.cache.l1.get(p.key, count_miss=False), "l1"
        if hit is not None:
            result = self._finish(from_cached(hit, tier), p)
            for event in (SourcesEvent(result.sources, tier), TokenEvent(result.answer), DoneEvent(result)):
                yield event
            return
        led: list[bool] = []  # filled by the factory, which only the run's leader calls
        flight_key = self._flight_key(p, deltas) if self.cache is not None else ""
        ticket = self.flight.context(flight_key) if self.cache is not None else None
        if isinstance(ticket, Ticket):
            # NOTE: a follower with a lower number raises the run it joins: in ragserve's
            # queue while the run waits there, and in vLLM if the run has not reached it yet.
            # vLLM has no call to change a request's priority once it is submitted: from
            # then on the follower waits with the run at the priority it was submitted with.
            self.admission.promote(ticket, p.priority)
        else:
            ticket = Ticket(p.priority)

        def start() -> AsyncIterator[StreamEvent]:
            led.append(True)
            return self._run(p, p.write and self.cache is not None, deltas, ticket)

        run = start() if self.cache is None else self.flight.subscribe(flight_key, start, context=ticket)
        async with aclosing(run) as events:
            async for event in events:
                if isinstance(event, DoneEvent):
                    event = DoneEvent(self._finish(_own_copy(event.result, clock, shared=not led), p))
                yield event

    async def _semantic_hit(self, p: _Prepared) -> QueryResult | None:
        """The semantic tier, after the exact tiers missed: embed the question (the vector is
        kept for the retrieval of a miss: one embedding either way), look for the nearest
        cached question of the request's partition and serve its answer."""
        assert self.cache is not None
        p.vector = await p.snapshot.retriever.embed(p.question, p.clock)
        found = await self.cache.lookup_semantic(self._partition(p), p.vector, p.question, p.clock)
        if found is None:
            return None
        value, match = found
        result = from_cached(value, "semantic")
        result.question = p.question
        result.semantic_match, result.semantic_similarity = match.question, round(match.similarity, 6)
        return self._finish(result, p)

    def _partition(self, p: _Prepared) -> str:
        assert self.cache is not None
        return self.cache.partition(p.namespace, p.snapshot.fingerprint, self._keyed_k(p.top_k),
                                    p.model.fingerprint if p.model is not None else None)

    def _flight_key(self, p: _Prepared, deltas: bool) -> str:
        """Which requests may share a run: a run that must not write only with callers that
        don't write either (a writer joining it would lose its write); a stream only a run
        that streams (else its first token would come with the last); a plain query any."""
        key = p.key if p.write else p.key + ":no-write"
        streaming = key + ":deltas"
        return streaming if deltas or streaming in self.flight else key

    async def _run(self, leader: _Prepared, write: bool, deltas: bool,
                   ticket: Ticket) -> AsyncIterator[StreamEvent]:
        """The miss path, run once for every request that shares it: admission →
        retrieve → prompt → generate → remember. ``deltas``: yield the answer as vLLM
        produces it; else vLLM sends only the final output and it comes as one piece."""
        clock, question, snap = StageClock(), leader.question, leader.snapshot
        # The run holds its index version itself: followers may outlive the leader.
        async with self.served.holding(snap), self.admission.slot(ticket) as waited:
            clock.add("admission", waited())
            sources, vector = await snap.retriever.retrieve_with_vector(question, leader.top_k, clock, leader.vector)
            routed = leader.model if isinstance(leader.model, Routed) else None
            model = routed.pick(sources) if routed is not None else leader.model or self.models.default
            generator = self._ensure_generator(model)
            with clock.span("prompt"):
                prompt = await self._prompt(model, generator, question, sources)
            yield SourcesEvent(prompt.used, "miss", sources.missing_shards)
            gen = None
            with clock.span("generate"):
                async for piece in generator.stream(prompt.text, leader.request_id, token_ids=prompt.token_ids,
                                                    deltas=deltas, **self._priority(ticket, model)):
                    if not isinstance(piece, str):
                        gen = piece
                    elif deltas:
                        yield TokenEvent(piece)
            if gen is None:
                raise GenerationError("the engine ended the stream without a final output")
            if not deltas:
                yield TokenEvent(gen.text)
            result = from_generation(question, model.label(), prompt, gen, clock, snap.fingerprint)
            result.request_id = leader.request_id
            result.missing_shards = list(sources.missing_shards)
            # Told once per run, whoever still waits for it; tracing names the span of the
            # generation, which every request's copy and the cached answer carry.
            origin = self.observers.generation(result)
            if origin is not None:
                result.origin_span = origin
        # NOTE: a partial answer (shards missing, ``ray.allow_partial``) is stored in no tier:
        # a later hit would serve it as whole. The run's followers get it, marked.
        if write and self.cache is not None and not result.missing_shards:
            self.cache.remember(leader.key, result)  # only a whole, successful answer is stored
            if routed is not None:  # the pick's own key too: asking for it by name is a hit
                self.cache.remember(self._key(leader, snap, model), result)
            if self.cache.semantic is not None:  # its partition is a hash: not on every miss
                self.cache.remember_vector(self._partition(leader), leader.key, question, vector)
        yield DoneEvent(result)

    def _priority(self, ticket: Ticket, model: Model) -> dict[str, int]:
        """The generator's ``priority=`` argument, given only with ``generate.scheduling =
        "priority"`` (vLLM refuses a non-zero priority without its priority scheduler, and a
        ``Generator`` written before priorities takes no such argument)."""
        return {"priority": ticket.priority} if model.config.generate.scheduling == "priority" else {}

    def _finish(self, result: QueryResult, p: _Prepared) -> QueryResult:
        """Stamp the caller's own total and request id, count the query, tell the observers."""
        clock = p.clock
        clock.ms["total"] = clock.elapsed_ms()
        result.timings = Timings(**clock.ms)
        result.request_id = p.request_id
        self.requests.answered(partial=bool(result.missing_shards))
        self.observers.result(result, clock.ms)
        return result

    async def _answer_many(self, questions: Sequence[str], namespace: str | None = None,
                           timeout_s: float | None = None,
                           priority: int = 0, model: str | None = None) -> list[QueryResult | Exception]:
        async def one(question: str) -> QueryResult:
            p = self._prepare(question, namespace, True, True, timeout_s, None, None, priority, model)
            return await self._answer(p)

        return await map_bounded(one, questions, self.config.query.max_in_flight)

    async def _prompt(self, model: Model, generator: Generator, question: str, sources: list[Source]) -> Any:
        builder = self.models.builder(model, generator)
        if getattr(builder.tokenizer, "remote", False):
            # NOTE: a tokenizer that asks a server (openai.tokenizer = "server") waits on the
            # network for each count: build off the engine loop, which other requests share.
            return await asyncio.to_thread(builder.build, question, sources)
        return builder.build(question, sources)

    def _builder(self, generator: Generator) -> Any:
        """The default model's prompt builder."""
        return self.models.builder(self.models.default, generator)


def check_semantic_model(config: SemanticConfig, embedder: Embedder) -> None:
    """A threshold calibrated for one embedding model means nothing for another."""
    if config.enabled and config.calibrated_model:
        name = str(embedder.identity.get("name", ""))
        if name != config.calibrated_model:
            raise ConfigError("semantic.calibrated_model",
                              f"the threshold was calibrated for {config.calibrated_model!r}, the index's "
                              f"embedding model is {name!r}: run `ragserve calibrate-semantic` for it")


_UUID4_CLEAR = ~(0xF000 << 64 | 0xC000 << 48)
_UUID4_SET = 0x4000 << 64 | 0x8000 << 48


def _new_request_id() -> str:
    """A new request id: ``uuid.uuid4().hex``'s value (the same random bits, version and
    variant), without the ``UUID`` object it builds (half an L1 hit's own time once)."""
    return "%032x" % (int.from_bytes(os.urandom(16), "big") & _UUID4_CLEAR | _UUID4_SET)


def _own_copy(run: QueryResult, clock: StageClock, shared: bool) -> QueryResult:
    """Each request sharing a run gets its own copy of the run's result: the run's stage
    times under its own cache lookups, and (stamped by ``_finish``) its own total; ``shared``
    when another request started the run."""
    result = dataclasses.replace(run, shared=shared)
    for stage, ms in run.timings.as_dict().items():
        if stage != "total" and ms:  # a stage the run never entered is not a 0 ms sample
            clock.ms.setdefault(stage, ms)
    return result
