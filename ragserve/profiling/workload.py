"""A realistic query workload: questions from the corpus or a file, a share of them asked
again, a fixed number of concurrent clients.

Repeats are drawn only from questions whose first answer has come back, as popular
questions arrive in real traffic: they are cache hits, never single-flight joins of a run
still in progress (whose stage times belong to another request). ``l2_share`` of the
repeats first drop their L1 entry, as if another replica had answered them, so the L2
(Redis) path is exercised too. Each run uses its own cache namespace: answers cached
before the run (by an earlier run or test) cannot turn its first questions into hits.

**Usage:**

    pool = load_questions("corpus", rag.docstore, n=48)
    result = run_workload(rag, pool, n=48, concurrency=8, repeat_share=0.25)
    [r.tier for r in result.records]          # "miss", "l1", "l2" or "error"
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ragserve.cache.keys import normalize_question
from ragserve.eval.paraphrases import rewrites

T = TypeVar("T")
_HEADING_RULE = re.compile(r"^([*=~^\-#])\1{3,}\s*$")
_TEMPLATES = ("What is {t}?", "How does {t} work?", "Explain {t}.", "What should I know about {t}?",
              "When is {t} used?", "Give an example of {t}.")


@dataclass(frozen=True)
class QueryRecord:
    """One query of a workload: what was asked, which tier answered, its stage times."""

    index: int
    question: str
    repeat: bool
    tier: str
    timings: dict[str, float]
    start_s: float
    end_s: float
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class WorkloadResult:
    records: list[QueryRecord]
    wall_s: float
    namespace: str
    settings: dict[str, Any] = field(default_factory=dict)

    def ok(self) -> list[QueryRecord]:
        return [r for r in self.records if r.error is None]

    def to_dict(self) -> dict[str, Any]:
        return {"wall_s": self.wall_s, "namespace": self.namespace, "settings": self.settings,
                "records": [asdict(r) for r in self.records]}


def _topics(text: str) -> list[str]:
    """Headings of a chunk (a line underlined with ****, ====, ----), as question topics."""
    lines = text.splitlines()
    out = []
    for prev, line in zip(lines, lines[1:]):
        title = prev.strip().strip('"')
        if _HEADING_RULE.match(line) and 3 <= len(title) <= 60:
            out.append(title[0].lower() + title[1:] if not title[:2].isupper() else title)
    return out


def corpus_questions(docstore: Any, n: int, seed: int = 0) -> list[str]:
    """Up to ``n`` distinct questions made from the index's own chunks: a chunk heading (or
    the document's name when it has none) put into one of a few question templates."""
    rng = random.Random(seed)
    ids = list(range(len(docstore)))
    rng.shuffle(ids)
    seen: set[str] = set()
    out: list[str] = []
    for cid in ids:
        chunk = docstore.get(cid)
        topics = _topics(chunk.text) or [Path(chunk.doc_id).stem.replace("-", " ").replace("_", " ")]
        q = normalize_question(rng.choice(_TEMPLATES).format(t=rng.choice(topics)))
        if q not in seen:
            seen.add(q)
            out.append(q)
        if len(out) >= n:
            break
    return out


def file_questions(path: str | Path) -> list[str]:
    """Questions from a file: ``.json`` in SQuAD/XQuAD layout (data → paragraphs → qas →
    question), anything else one question per line (blank lines and ``#`` lines skipped)."""
    path = Path(path)
    text = path.read_text("utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        return [qa["question"] for art in data["data"] for p in art["paragraphs"] for qa in p["qas"]]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_questions(source: str, docstore: Any, n: int, seed: int = 0) -> list[str]:
    """``source`` is ``"corpus"`` (made from the index) or a question file; returns up to
    ``n`` distinct questions (distinct after normalisation, so no two share a cache key)."""
    if source == "corpus":
        return corpus_questions(docstore, n, seed)
    pool = list(dict.fromkeys(normalize_question(q) for q in file_questions(source)))
    random.Random(seed).shuffle(pool)
    return pool[:n]


def plan(n: int, repeat_share: float, seed: int = 0) -> list[bool]:
    """Which of ``n`` slots are repeats (True): exactly ``round(n * repeat_share)`` of them,
    spread at random but never the first slot."""
    repeats = min(round(n * repeat_share), max(n - 1, 0))
    slots = [True] * repeats + [False] * (n - 1 - repeats)
    random.Random(seed).shuffle(slots)
    return ([False] + slots)[:n]


def zipf_stream(items: Sequence[T], n: int, s: float = 1.1, seed: int = 0) -> list[T]:
    """``n`` draws, i.i.d., from a Zipf(``s``) law over ``items``: the item of popularity
    rank r (a fixed random ranking, shuffled with ``seed``) comes with probability
    proportional to 1 / r^s. Questions that share popular documents come back as they do
    in real traffic; ``s`` near 1 gives a long tail of questions asked once.

    **Usage:** ``zipf_stream(dataset.questions, 2000, s=1.1, seed=0)``
    """
    return zipf_days(items, n, s, seed, days=1)[0]


def zipf_days(items: Sequence[T], n: int, s: float = 1.1, seed: int = 0, days: int = 2) -> list[list[T]]:
    """``days`` independent streams of ``n`` draws from ONE Zipf(``s``) law (one popularity
    ranking, from ``seed``): yesterday's traffic and today's. The first is ``zipf_stream``'s
    stream for the same arguments; each later day draws with its own generator.

    **Usage:** ``yesterday, today = zipf_days(dataset.questions, 2000, s=1.1, seed=0)``
    """
    if not items:
        raise ValueError("zipf_days needs at least one item")
    rng = random.Random(seed)
    ranked = rng.sample(list(items), len(items))
    weights = [1.0 / (r ** s) for r in range(1, len(ranked) + 1)]
    out = [rng.choices(ranked, weights=weights, k=n)]
    for day in range(1, days):
        out.append(random.Random(f"{seed}/day{day}").choices(ranked, weights=weights, k=n))
    return out


def paraphrase_repeats(stream: Sequence[T], p: float, text: Callable[[T], str], seed: int = 0,
                       key: Callable[[T], Hashable] | None = None) -> list[tuple[T, str]]:
    """``stream`` as users ask it when they reword what others asked before: each repeat of
    an item (a draw of an item drawn earlier; ``key`` tells items apart, the item itself by
    default) is, with probability ``p``, one of its question's meaning-keeping rewrites
    (``ragserve.eval.paraphrases.rewrites``: a polite frame, "What is" → "What's", ...)
    instead of the same text. A first draw is always asked as it is. Returns (item, text
    asked) per draw, in order.

    The choices come from a generator of their own, seeded with ``seed`` and ``p``: a stream
    and a ``p`` give the same texts in every benchmark that asks for them, and ``p = 0`` is
    the stream unchanged. The exact tiers can hit at most the repeated texts; a tier that
    answers meanings at most ``repeat_ceiling`` of the stream.

    **Usage:**

        stream = zipf_stream(dataset.questions, 2000, s=1.1, seed=0)
        asked = paraphrase_repeats(stream, 0.3, lambda q: q.text, key=lambda q: q.qid)
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1] (the probability a repeat is reworded), got {p}")
    key_of = key if key is not None else (lambda item: item)
    rng, seen, asked = random.Random(f"{seed}/{float(p)}"), set(), []
    for item in stream:
        t, k = text(item), key_of(item)
        if k in seen and rng.random() < p:
            t = rng.choice(rewrites(t))
        seen.add(k)
        asked.append((item, t))
    return asked


def repeat_ceiling(keys: Sequence[Hashable]) -> float:
    """The share of requests a cache that answers meanings could serve: 1 − distinct
    meanings ÷ requests (every request but the first of its meaning), for the meanings
    ``keys`` of a stream's requests; NaN for an empty stream.

    **Usage:** ``repeat_ceiling([q.qid for q in stream])``
    """
    return 1.0 - len(set(keys)) / len(keys) if len(keys) else float("nan")


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of ``n`` open-loop requests arriving at ``rate``
    per second on average (exponential gaps): traffic that does not wait for answers.

    **Usage:** ``for t, q in zip(poisson_arrivals(len(stream), 8.0), stream): ...``
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    rng = random.Random(f"{seed}/arrivals")
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def arun_workload(rag: Any, pool: Sequence[str], *, n: int, concurrency: int = 8,
                        repeat_share: float = 0.25, l2_share: float = 0.0, seed: int = 0,
                        namespace: str | None = None, model: str | None = None) -> WorkloadResult:
    """Ask ``n`` questions with ``concurrency`` clients (each asks its next question when its
    last one is answered); new questions come from ``pool`` in order. ``model``: which of
    ``[models]`` answers (None: the default)."""
    slots = plan(n, repeat_share, seed)
    if sum(not s for s in slots) > len(pool):
        raise ValueError(f"{sum(not s for s in slots)} distinct questions needed, the pool has {len(pool)}")
    namespace = namespace or f"profile-{uuid.uuid4().hex[:8]}"
    rng = random.Random(seed + 1)
    fresh = iter(pool)
    answered: list[str] = []
    first_answer = asyncio.Event()  # set at the first answer, or when no new question is left
    new_left = [sum(not s for s in slots)]
    next_slot = iter(enumerate(slots))
    records: list[QueryRecord] = []
    l2 = getattr(getattr(rag, "cache", None), "l2", None)
    t0 = time.perf_counter()

    async def ask(i: int, repeat: bool) -> None:
        if repeat:
            await first_answer.wait()
            if not answered:
                records.append(QueryRecord(i, "", True, "error", {}, 0.0, 0.0, "every new question failed"))
                return
            q = rng.choice(answered)
            if l2 is not None and rng.random() < l2_share:
                await rag.aflush_cache()  # its background L2 write has landed
                rag.cache.l1.delete(rag.cache.key(q, namespace, rag.fingerprint))
        else:
            q = next(fresh)
        start = time.perf_counter() - t0
        try:
            r = await rag.aquery(q, namespace=namespace, model=model)
        except Exception as e:  # a failed query is a finding of the run, not its end
            records.append(QueryRecord(i, q, repeat, "error", {}, start, time.perf_counter() - t0, repr(e)))
        else:
            records.append(QueryRecord(i, q, repeat, r.cache_tier, r.timings.as_dict(), start,
                                       time.perf_counter() - t0, None, r.usage.prompt_tokens,
                                       r.usage.completion_tokens))
            if not repeat:
                answered.append(r.question)
        if not repeat:
            new_left[0] -= 1
            if answered or not new_left[0]:
                first_answer.set()

    async def client() -> None:
        for i, repeat in next_slot:
            await ask(i, repeat)

    await asyncio.gather(*(client() for _ in range(max(1, concurrency))))
    settings = {"questions": n, "concurrency": concurrency, "repeat_share": repeat_share,
                "l2_share": l2_share if l2 is not None else 0.0, "seed": seed}
    return WorkloadResult(sorted(records, key=lambda r: r.index), time.perf_counter() - t0, namespace, settings)


def run_workload(rag: Any, pool: Sequence[str], **kwargs: Any) -> WorkloadResult:
    """Blocking ``arun_workload`` (runs the clients on a fresh event loop of this thread)."""
    return asyncio.run(arun_workload(rag, pool, **kwargs))
