"""``Engine``: the stages of ``pipeline.py`` with their verbs: answer, stream, retrieve,
reload, stats, close. ``ragserve.RAG`` holds one and exposes the verbs a user needs.

``query()`` blocks; ``aquery()`` works from any event loop; both run on one engine loop
thread (``runtime.py``). The order of the stages is ``pipeline.py``'s.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ragserve.engine.admission import deadline
from ragserve.engine.pipeline import EMBED_THREAD, Pipeline
from ragserve.engine.served import describe, open_served
from ragserve.engine.validation import check_options
from ragserve.errors import InputError
from ragserve.index.manifest import Manifest
from ragserve.observe.timing import StageClock
from ragserve.retrieval.retriever import Retriever
from ragserve.types import DocStore, Generator, QueryResult, Sources, StreamEvent, VectorIndex

T = TypeVar("T")


class Engine(Pipeline):
    """A served index and the verbs over its pipeline (see ``ragserve.RAG`` for each one's
    contract: ``RAG`` is the public face and documents them)."""

    def warm_up(self) -> None:

        async def start() -> None:
            for model in self.models.all():  # every model is warm before the server is ready
                self._ensure_generator(model)

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
        target = Path(path) if path is not None else self.path
        if target is None:
            raise InputError("reload needs a path: this engine was not opened with RAG.from_index")
        with self._reload_lock:  # one reload at a time; requests are never blocked by it
            new = open_served(target, self.config, self.embedder, self._cpu, self.shard_opener)
            previous = self.served.current
            if new.fingerprint == previous.fingerprint:
                new.close()
                return {"changed": False, "previous": previous.fingerprint, **describe(previous)}
            self.served.swap(new)
            self.path = target
        return {"changed": True, "previous": previous.fingerprint, **describe(new)}

    # -- public API ---------------------------------------------------------------------

    def query(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
              cache_write: bool = True, timeout_s: float | None = None,
              request_id: str | None = None, top_k: int | None = None,
              priority: int = 0, model: str | None = None) -> QueryResult:
        p = self._prepare(question, namespace, cache_read, cache_write, timeout_s, request_id, top_k,
                          priority, model)
        return self._l1_hit(p) or self._runtime.run(self._answer(p))

    async def aquery(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
                     cache_write: bool = True, timeout_s: float | None = None,
                     request_id: str | None = None, top_k: int | None = None,
                     priority: int = 0, model: str | None = None) -> QueryResult:
        p = self._prepare(question, namespace, cache_read, cache_write, timeout_s, request_id, top_k,
                          priority, model)
        return self._l1_hit(p) or await self._runtime.run_async(self._answer(p))

    def query_batch(self, questions: Sequence[str], *, namespace: str | None = None,
                    timeout_s: float | None = None, priority: int = 0,
                    model: str | None = None) -> list[QueryResult | Exception]:
        return self._runtime.run(self._answer_many(questions, namespace, timeout_s, priority, model))

    async def aquery_batch(self, questions: Sequence[str], *, namespace: str | None = None,
                           timeout_s: float | None = None,
                           priority: int = 0, model: str | None = None) -> list[QueryResult | Exception]:
        return await self._runtime.run_async(self._answer_many(questions, namespace, timeout_s, priority,
                                                               model))

    def stream(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
               cache_write: bool = True, timeout_s: float | None = None,
               request_id: str | None = None, top_k: int | None = None,
               priority: int = 0, model: str | None = None) -> Iterator[StreamEvent]:
        p = self._prepare(question, namespace, cache_read, cache_write, timeout_s, request_id, top_k,
                          priority, model)
        return self._runtime.iterate(self._stream(p))

    def astream(self, question: str, *, namespace: str | None = None, cache_read: bool = True,
                cache_write: bool = True, timeout_s: float | None = None,
                request_id: str | None = None, top_k: int | None = None,
                priority: int = 0, model: str | None = None) -> AsyncIterator[StreamEvent]:
        p = self._prepare(question, namespace, cache_read, cache_write, timeout_s, request_id, top_k,
                          priority, model)
        return self._runtime.aiterate(self._stream(p))

    def retrieve(self, question: str, top_k: int | None = None) -> Sources:
        question = self._check(question)
        check_options(top_k=top_k)  # as a query's: 0 is not "the default", 10**6 not a search
        return self._runtime.run(self._retrieve(question, top_k or self.config.query.top_k))

    async def aretrieve(self, question: str, top_k: int | None = None) -> Sources:
        question = self._check(question)
        check_options(top_k=top_k)
        return await self._runtime.run_async(self._retrieve(question, top_k or self.config.query.top_k))

    async def _retrieve(self, question: str, top_k: int) -> Sources:
        """Within ``retrievals``' bounds (else ``OverloadedError``) and ``query.timeout_s``."""
        async with self.retrievals.slot(), deadline(self.config.query.timeout_s):
            snap = self.served.acquire()
            try:
                sources = await snap.retriever.retrieve(question, top_k, StageClock())
                if sources.missing_shards:
                    self.requests.retrieved_partial()
                return sources
            finally:
                self.served.release(snap)

    def stats(self) -> dict[str, Any]:
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
            "models": self._models_stats(),
            "single_flight": {"runs": self.flight.runs, "shared": self.flight.shared, "running": len(self.flight)},
            "cache": self.cache.stats() if self.cache else None,
        }

    def _models_stats(self) -> dict[str, Any] | None:
        """Per named model (None without ``[models]``): its backend, and whether its engine is
        one it shares with another model."""
        if not self.models.named:
            return None
        models = self.models.all()
        owners = {id(m.generator): m.name for m in models if m.generator is not None}
        return {m.name: {"backend": m.config.generate.backend, "max_tokens": m.config.generate.max_tokens,
                         "started": m.generator is not None,
                         "shares_engine_of": owners.get(id(getattr(m.generator, "owner", None)))}
                for m in models}

    async def aflush_cache(self) -> None:
        if self.cache is not None and self.cache.l2 is not None:
            await self._runtime.run_async(self.cache.l2.drain())

    def reset_prefix_cache(self, attempts: int = 50) -> bool:
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
        """The default model's generator started, and every one started alive."""
        return self.generator is not None and all(_alive(g) for g in self.models.generators())

    def engine_unfinished(self) -> int | None:
        unfinished = getattr(self.generator, "unfinished", None)
        return unfinished() if unfinished else None

    def close(self) -> None:
        if self._runtime.running:
            # Requests still running are cancelled (vLLM aborts them); cache writes finish.
            writes = self.cache.l2.tasks if self.cache is not None and self.cache.l2 is not None else set()
            self._runtime.cancel_tasks(keep=lambda t: t in writes)

            async def stop() -> None:
                if self.cache is not None:
                    await self.cache.close()
                for generator in self.models.generators():
                    aclose = getattr(generator, "aclose", None)  # an async backend closes politely
                    if aclose is not None:
                        await aclose()
                    else:
                        generator.shutdown()  # one sharing another's engine leaves it running

            self._runtime.run(stop())
        self._runtime.stop()
        if self.cache is not None:
            self.cache.stop_server()
        self.served.close()
        self._cpu.shutdown(wait=True)

    # -- for tools: benchmarks, profilers, tests ---------------------------------------

    def call(self, work: Coroutine[Any, Any, T]) -> T:
        return self._runtime.run(work)

    async def acall(self, work: Coroutine[Any, Any, T]) -> T:
        return await self._runtime.run_async(work)

    def flush_cache(self) -> None:
        if self.cache is not None and self.cache.l2 is not None:
            self._runtime.run(self.cache.l2.drain())

    def prompt_builder(self) -> Any:
        return self._builder(self._runtime.run(self._started()))

    async def _started(self) -> Generator:
        return self._ensure_generator()

    def run_in_threads(self, fn: Callable[[str], None], timeout_s: float = 30.0) -> None:
        done = threading.Event()
        failed: list[BaseException] = []

        def on_loop() -> None:
            try:
                fn("engine-loop")
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                failed.append(e)
            finally:
                done.set()

        self._runtime.loop.call_soon_threadsafe(on_loop)
        if not done.wait(timeout_s):
            raise TimeoutError(f"the engine loop did not run {fn!r} within {timeout_s} s")
        if failed:
            raise failed[0]
        self._cpu.submit(fn, f"{EMBED_THREAD}-0").result(timeout=timeout_s)


def _alive(generator: Generator) -> bool:
    alive = getattr(generator, "alive", None)
    return alive() if alive else True
