"""Warming the answer cache from a question log, so that a service starts the day warm.

``ragserve warm INDEX QUESTIONS.jsonl`` asks each distinct question of a log through the
engine's own API (``RAG.aquery``, cache read and write, as ``ragserve batch`` does), so
every answer lands in L2 (Redis) under the key a server computes for it: same index
fingerprint, models, sampling, prompt, top_k and namespace. No key is derived here.

- Where: the config resolves as ``ragserve serve`` resolves it (``serve_config``): with no
  Redis URL, the embedded Redis persisted in ``$RAGSERVE_HOME/redis`` (shared with a server
  already running on that folder). No L2 (the cache off, or a Redis URL that does not
  answer) is a ``NoL2Error`` before anything loads: warming only the L1 of a process that
  then exits would do nothing.
- What first: a log has repeats. Questions are deduplicated by the cache's own
  normalisation (``cache.normalize_question``) and the most frequent are warmed first
  (ties in order of first appearance), so ``limit`` keeps the top N.
- Resume: a question whose answer is already in L2 counts as "already warm" and costs no
  generation, so running again after an interruption does only what is left.
- L1 is off while warming (keys do not depend on it): every lookup goes to Redis, so
  "already warm" means in L2, not in this process's memory. Each Redis call may take at
  least ``MIN_L2_TIMEOUT_MS``: a batch job can wait for Redis, and a write lost to the
  serving timeout is a generation paid for nothing. Writes are awaited and counted at the
  end; an answer generated but not stored is reported (``not_stored``) and is generated
  again by the next run.
- One failed question is counted with its reason and does not stop the run.

The input is the questions file of ``ragserve batch`` (``batch.read_questions``), checked
in full before any model loads (``BatchInputError`` names the line).

**Usage:**

    from ragserve.jobs.warm import warm
    summary = warm("indexes/docs", "yesterday.jsonl", RAGConfig.load(), limit=1000)
    print(summary.as_dict())   # distinct, warmed, already_warm, failed, seconds, ...

From async code, open the ``RAG`` with ``warm_config(config)`` and ``await run_warm(rag, plan)``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragserve.cache.keys import normalize_question
from ragserve.config import RAGConfig
from ragserve.engine.validation import check_options
from ragserve.errors import InvalidParameterError, NoL2Error
from ragserve.jobs.batch import check_questions, read_questions, work_through

MIN_L2_TIMEOUT_MS = 1000.0
"""The least time each Redis call of a warm run may take (``cache.l2_timeout_ms`` serves
queries and is tens of ms)."""


@dataclass(frozen=True)
class WarmItem:
    question: str
    """Normalised: the text the cache keys on."""
    count: int
    """How often the log asks it (in any spelling that normalises to it)."""
    first_id: str
    """The id of its first line in the log."""


@dataclass(frozen=True)
class WarmPlan:
    items: list[WarmItem]
    """What this run warms, most frequent first."""
    lines: int
    """Questions in the log, repeats included."""
    distinct: int
    """Distinct questions in the log (``items`` holds fewer under a limit)."""


def plan_warm(questions: Sequence[tuple[str, str]], limit: int | None = None) -> WarmPlan:
    """The distinct questions of ``(id, question)`` pairs, most frequent first (ties: first
    appearance), at most ``limit`` of them.

    **Usage:** ``plan_warm([("1", "a?"), ("2", "b?"), ("3", " a? ")]).items[0]`` is
    ``WarmItem("a?", 2, "1")``.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InvalidParameterError("limit", limit, "an int >= 1")
    counts: dict[str, int] = {}
    first: dict[str, tuple[int, str]] = {}
    for n, (qid, question) in enumerate(questions):
        key = normalize_question(question)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, (n, qid))
    order = sorted(counts, key=lambda q: (-counts[q], first[q][0]))
    items = [WarmItem(q, counts[q], first[q][1]) for q in order[:limit]]
    return WarmPlan(items, lines=len(questions), distinct=len(counts))


def load_plan(path: str | Path, config: RAGConfig, limit: int | None = None) -> WarmPlan:
    """Read and check a question log (every bad line or question refused before any model
    loads, as ``ragserve batch`` does), then ``plan_warm`` it."""
    items = read_questions(path)
    check_questions(items, config.query.max_question_chars, path)
    return plan_warm(items, limit)


def warm_config(config: RAGConfig) -> RAGConfig:
    """The config of a warm run: ``serve_config``'s (so the L2 is the one ``ragserve serve``
    would use), with L1 off and a Redis timeout fit for a batch job (see the module doc).
    Neither changes a cache key. Raises ``NoL2Error`` when there is no L2."""
    from ragserve.config import serve_config

    served = serve_config(config)
    c = served.cache
    if not c.enabled:
        raise NoL2Error("cache.enabled", "the answer cache is off, so there is no L2 to warm; "
                                         "turn it on (RAGSERVE_CACHE_ENABLED=true) to warm it")
    if not c.redis_url:  # serve_config sets one whenever the cache is on; kept in case it stops
        raise NoL2Error("cache.redis_url", "no L2 is configured; set a Redis URL or \"embedded\"")
    timeout_ms = max(c.l2_timeout_ms, MIN_L2_TIMEOUT_MS)
    return served.replace(cache={"l1_max_entries": 0, "l2_timeout_ms": timeout_ms})


def check_l2_answers(config: RAGConfig) -> None:
    """A Redis given by URL must answer a PING before anything loads (an embedded one is
    started, or joined, when the engine opens). Raises ``NoL2Error``."""
    url = config.cache.redis_url
    if url == "embedded":
        return
    import redis

    timeout = max(config.cache.l2_timeout_ms, MIN_L2_TIMEOUT_MS) / 1000
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    except Exception as e:  # noqa: BLE001 - refused, timed out, auth, bad URL: all say the same
        raise NoL2Error("cache.redis_url", f"{url} does not answer ({type(e).__name__}: {e}); "
                                           "start it or point cache.redis_url elsewhere") from None
    finally:
        client.close()


@dataclass
class WarmSummary:
    lines: int
    """Questions in the log, repeats included."""
    distinct: int
    """Distinct questions in the log."""
    total: int
    """Distinct questions this run warms (all of them, or the top ``limit``)."""
    warmed: int = 0
    """Generated now and stored in L2."""
    already_warm: int = 0
    """Found in L2: nothing generated."""
    failed: int = 0
    not_stored: int = 0
    """Generated, but the L2 write failed (Redis errors; see ``l2_error``): the next run
    generates them again."""
    failures: list[tuple[str, str]] = field(default_factory=list)
    """``(question, reason)`` of each failed question."""
    seconds: float = 0.0
    l2: str = ""
    """The Redis URL warmed."""
    l2_error: str = ""
    namespace: str = ""

    @property
    def done(self) -> int:
        """Questions finished so far, whatever the outcome (``not_stored`` are in ``warmed``
        until the end of the run)."""
        return self.warmed + self.already_warm + self.failed

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        """Every question of the run is warm."""
        return not self.failed and not self.not_stored

    def as_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "distinct": self.distinct, "total": self.total, "warmed": self.warmed,
                "already_warm": self.already_warm, "failed": self.failed, "not_stored": self.not_stored,
                "seconds": round(self.seconds, 2), "questions_per_s": round(self.per_second, 3),
                "l2": self.l2, "namespace": self.namespace, "l2_error": self.l2_error,
                "failures": [{"question": q, "error": e} for q, e in self.failures]}


async def run_warm(
    rag: Any,
    plan: WarmPlan,
    *,
    namespace: str | None = None,
    concurrency: int = 16,
    timeout_s: float | None = None,
    model: str | None = None,
    on_start: Callable[[WarmSummary], None] | None = None,
    on_done: Callable[[WarmSummary], None] | None = None,
    on_answer: Callable[[WarmItem, Any], None] | None = None,
) -> WarmSummary:
    """Warm ``plan`` into the L2 of an open ``rag`` (see the module doc), at most
    ``concurrency`` questions at once; ``on_done`` after each question, ``on_answer`` with
    each question's ``QueryResult`` (the answer the service will serve for it). ``model``:
    which of ``[models]`` to warm (its keys are its own; None: the default, or the router's
    pick, as a request that names no model gets).

    Open ``rag`` with ``warm_config``: with L1 on, an answer this process already holds in
    L1 counts as already warm whether or not its L2 write succeeded.
    """
    cache = rag.cache
    if cache is None or cache.l2 is None:
        raise NoL2Error("cache.redis_url", "this RAG has no L2 to warm; open it with warm_config(config)")
    check_options(namespace=namespace)
    summary = WarmSummary(plan.lines, plan.distinct, len(plan.items), l2=cache.l2.url,
                          namespace=cache.config.namespace if namespace is None else namespace)
    if on_start:
        on_start(summary)
    writes_before = cache.l2.stats.writes
    started = time.perf_counter()

    async def ask(item: WarmItem) -> Any:
        return await rag.aquery(item.question, namespace=namespace, timeout_s=timeout_s, model=model)

    def done(item: WarmItem, result: Any) -> None:
        if isinstance(result, Exception):
            summary.failed += 1
            summary.failures.append((item.question, f"{type(result).__name__}: {result}"))
        elif result.cache_tier == "miss":
            summary.warmed += 1
        else:
            summary.already_warm += 1
        if on_answer and not isinstance(result, Exception):
            on_answer(item, result)
        summary.seconds = time.perf_counter() - started
        if on_done:
            on_done(summary)

    await work_through(plan.items, ask, done, concurrency)
    await rag.aflush_cache()
    # NOTE: counted after the writes end, not per question: a write runs in the background,
    # after the answer is returned. A rag serving other traffic at the same time would add
    # its writes here; warm() owns its rag.
    stored = cache.l2.stats.writes - writes_before
    summary.not_stored = max(0, summary.warmed - stored)
    summary.warmed -= summary.not_stored
    if summary.not_stored:
        summary.l2_error = cache.l2.last_error
    summary.seconds = time.perf_counter() - started
    return summary


def warm(
    index: str | Path,
    questions: str | Path,
    config: RAGConfig | None = None,
    *,
    namespace: str | None = None,
    limit: int | None = None,
    concurrency: int = 16,
    timeout_s: float | None = None,
    model: str | None = None,
    on_start: Callable[[WarmSummary], None] | None = None,
    on_done: Callable[[WarmSummary], None] | None = None,
    on_answer: Callable[[WarmItem, Any], None] | None = None,
    embedder: Any = None,
    generator: Any = None,
) -> WarmSummary:
    """Warm the L2 that ``ragserve serve INDEX`` with ``config`` reads from the question
    log ``questions`` (see the module doc); ``namespace``: a tenant's (a server with API
    keys uses its key's). Blocks; opens and closes its own engine (``embedder`` /
    ``generator``: as for ``RAG.from_index``).

    Refuses before anything loads: ``NoL2Error`` (no L2), ``BatchInputError`` (a bad line
    or question), ``InvalidParameterError`` (namespace, limit), ``UnknownModelError``
    (``model`` not in ``[models]``). A ``KeyboardInterrupt``
    keeps what is warmed (the engine closes and flushes its writes) and is raised again.
    """
    from ragserve.rag import RAG

    config = warm_config(config or RAGConfig.load())
    check_options(namespace=namespace)
    config.models.check(model)
    if concurrency < 1:
        raise InvalidParameterError("concurrency", concurrency, "an int >= 1")
    plan = load_plan(questions, config, limit)
    check_l2_answers(config)
    with RAG.from_index(index, config, embedder=embedder, generator=generator) as rag:
        return asyncio.run(run_warm(rag, plan, namespace=namespace, concurrency=concurrency,
                                    timeout_s=timeout_s, model=model, on_start=on_start,
                                    on_done=on_done, on_answer=on_answer))
