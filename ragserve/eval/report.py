"""The one evaluation report: what ``ragserve eval`` writes with ``--json`` and what
``POST /admin/eval`` returns per configuration are both ``build_report``'s ``EvalReport``.

Given a served ``RAG`` and questions (with relevant documents, gold answers, or both):

1. **The exact reference**: an exact float32 ``IndexFlatIP`` over the float32 embeddings
   of the same chunks: the index's kept ``vectors.f32.npy`` (``ragserve eval`` builds keep
   them), else the chunks' texts embedded again by the same model, for an index of at most
   ``REEMBED_MAX`` chunks (remembered per index fingerprint, so a server pays it once).
   NOTE: never vectors reconstructed from the index: those are already rounded to float16,
   so the reference would share the error it is meant to measure. Past ``REEMBED_MAX``
   there is no reference: ``exact`` and ``agreement10`` are null.
2. **Metrics pass**: every question embedded once, in batches; both indexes searched with
   the same query vectors, so only the index differs. Quality means are over the questions
   that name relevant documents (``dataset.labelled``; null when none does).
3. **Latency pass**: one question at a time through ``aretrieve`` (embed + search +
   docload) of the served ``RAG`` and of the reference wrapped in a second ``RAG`` sharing
   the model, alternating which goes first; plus the search stage alone per query vector.
4. **Answers** (``answers=True``): every question through ``aquery`` with the answer cache
   bypassed (read and write), ``concurrency`` in flight, asking for ``model`` (one of
   ``[models]``; None: what a request naming none gets), scored by ``answers.score``; each
   stage's p50/p95 over the answers' own ``Timings`` beside the scores. Which model
   answered is in ``config.model`` (the one asked for), ``answers.models`` (answers per
   model that gave them) and each question's row.

The blocking work (embedding, searching, reading the docstore) runs on the served
engine's one embedding thread (``rag.retriever.executor``), never on the caller's event
loop, and in slices, so a server's live requests keep their place between them.

``schema`` ``ragserve.eval/2`` names the shape of the report and of a list of them (``{"schema",
"reports": [{"name", "report"}]}``, the comparison of configurations): keys are added under a
schema, never renamed or removed. (``/1`` was the CLI's report before it had ``config``,
``stages``, ``dataset.labelled``, ``index.exact_from`` and ``seconds.reference``; the
endpoint's ``ragserve.eval-runs/1`` is gone: its runs are these reports.)

**Usage:** ``report = await build_report(rag, questions, dataset=dataset_info(...), answers=True)``
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import orjson

from ragserve.errors import RagserveError
from ragserve.eval.answers import ANSWER_ROW_KEYS, AnswerMetrics, answer_all, score, summarize
from ragserve.eval.datasets import EvalQuestion
from ragserve.eval.scoring import dedupe, hit_at, mrr_at, ndcg_at, overlap_at, percentile, recall_at
from ragserve.index.writer import VECTORS_FILE
from ragserve.observe.timing import StageStats
from ragserve.types import Timings

T = TypeVar("T")
ProgressFn = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: ``reference``, ``questions``, ``latency``, ``answers``."""

SCHEMA = "ragserve.eval/2"
KS = (1, 3, 10)
DEPTH = 10
MAX_TOP_K = 100
"""``aretrieve``'s bound on ``top_k`` (``engine/validation.check_options``)."""
REEMBED_MAX = 50_000
"""The most chunks embedded again for the exact reference of an index without kept vectors
(MiniLM on 2 CPU cores: a few hundred chunks a second)."""
_SLICE = 256
"""Chunks or questions per job on the embedding thread."""
_WARMUP = 3


@dataclass
class RetrievalMetrics:
    """Retrieval quality over the labelled questions (means; None when none is labelled)
    and latency per single question (ms)."""

    hit: dict[int, float | None]
    recall: dict[int, float | None]
    mrr10: float | None
    ndcg10: float | None
    search_ms: tuple[float, float]
    """p50, p95 of the search stage alone, one query vector per call."""
    retrieve_ms: tuple[float, float]
    """p50, p95 of ``aretrieve``: embed + search + docload, one question per call."""


@dataclass
class EvalReport:
    dataset: dict[str, Any]
    index: dict[str, Any]
    config: dict[str, Any]
    """What a request may change, as this report ran it: ``top_k``, ``concurrency`` and
    ``model`` (the model the answers were asked of; None: none named)."""
    served: RetrievalMetrics
    exact: RetrievalMetrics | None
    """None when there is no exact reference (``index.exact_from`` is None)."""
    agreement10: float | None
    """Mean overlap of the served top-10 documents with the exact top-10 (ANN recall@10)."""
    single_matches_batched: float
    """Share of questions whose top document from ``aretrieve`` (one at a time) equals the
    metrics pass's (batched embedding): a check that both passes measure the same thing."""
    answers: AnswerMetrics | None = None
    stages: dict[str, dict[str, float]] | None = None
    """Each stage's count, mean, p50/p95/p99 (ms) over the answers (None without answers)."""
    seconds: dict[str, float] = field(default_factory=dict)
    per_question: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON values (what ``--json`` writes and the endpoint returns): the
        same dict either way, keys as strings."""
        data = {"schema": SCHEMA, **dataclasses.asdict(self)}
        return orjson.loads(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY))

    def rows(self) -> list[tuple[str, str, str]]:
        """(metric, served index, exact fp32) rows for a table."""
        s, e = self.served, self.exact

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        rows = [(f"hit@{k}", f(s.hit[k]), f(e.hit[k] if e else None)) for k in KS]
        rows += [(f"recall@{k}", f(s.recall[k]), f(e.recall[k] if e else None)) for k in KS]
        rows += [("MRR@10", f(s.mrr10), f(e.mrr10 if e else None)),
                 ("nDCG@10", f(s.ndcg10), f(e.ndcg10 if e else None)),
                 ("top-10 overlap with exact", f(self.agreement10), "1.000" if e else "-")]
        for name, attr in (("search", "search_ms"), ("retrieve", "retrieve_ms")):
            a = getattr(s, attr)
            b = f"{getattr(e, attr)[0]:.2f} / {getattr(e, attr)[1]:.2f}" if e else "-"
            rows.append((f"{name} ms p50 / p95", f"{a[0]:.2f} / {a[1]:.2f}", b))
        return rows


def dataset_info(name: str, kind: str, questions: int, *, path: str | None = None,
                 documents: int | None = None, labelled: int, sample: int | None = None,
                 seed: int | None = None, notes: Sequence[str] = ()) -> dict[str, Any]:
    """The report's ``dataset`` object (``documents``: None when the questions came without
    documents, to be asked of an existing index)."""
    return {"name": name, "kind": kind, "path": path, "documents": documents, "questions": questions,
            "labelled": labelled, "sample": sample, "seed": seed if sample else None, "notes": list(notes)}


async def build_report(rag: Any, questions: Sequence[EvalQuestion], *, dataset: dict[str, Any],
                       answers: bool = False, top_k: int | None = None, concurrency: int = 16,
                       model: str | None = None, reused: bool = True, seconds: dict[str, float] | None = None,
                       started: float | None = None, progress: ProgressFn | None = None) -> EvalReport:
    """Measure ``rag``'s served index (and with ``answers``, its answers by ``model``) on
    ``questions`` (see the module docstring). ``reused``: the index was not built for this report;
    ``seconds``: phases the caller timed before (``build``), kept in the report's;
    ``started``: the caller's ``time.perf_counter()`` when the work began (``seconds.total``
    counts from it; default: from this call)."""
    from ragserve.rag import RAG
    from ragserve.retrieval.faiss_index import FaissIndex

    if answers:  # an unknown model fails the report once, before any pass (not once per question)
        rag.models.choose(model)
    t0 = time.perf_counter()
    seconds = {"build": 0.0, **(seconds or {})}
    cpu = rag.retriever.executor
    loop = asyncio.get_running_loop()

    async def on_cpu(fn: Callable[..., T], *args: Any) -> T:
        return await loop.run_in_executor(cpu, fn, *args)

    snap = rag.served.acquire()  # one index version throughout; none of its files closes under us
    try:
        manifest, index, docstore = snap.manifest, snap.index, snap.docstore
        t = time.perf_counter()
        vectors, exact_from = await _reference_vectors(rag, snap, on_cpu, progress)
        exact = (FaissIndex.build(np.ascontiguousarray(vectors, dtype=np.float32), "flat-fp32")
                 if vectors is not None else None)
        seconds["reference"] = time.perf_counter() - t
        doc_of = await on_cpu(_doc_ids, docstore)
        # A document may be split into several chunks: search deep enough that DEPTH distinct
        # documents remain after de-duplication.
        depth = min(index.ntotal, DEPTH * math.ceil(len(doc_of) / max(1, len(set(doc_of)))))
        t = time.perf_counter()
        qv = await _embed_questions(on_cpu, rag.embedder, questions, rag.config.embed.batch_size, progress)
        served_ranked = _ranked(await on_cpu(index.search, qv, depth), doc_of)
        exact_ranked = _ranked(await on_cpu(exact.search, qv, depth), doc_of) if exact is not None else None
        seconds["metrics_pass"] = time.perf_counter() - t
        t = time.perf_counter()
        ref_config = rag.config.replace(cache={"enabled": False})
        ref = (RAG(manifest, exact, _Borrowed(docstore), rag.embedder, None, ref_config)
               if exact is not None else None)
        try:
            timing = await _latency_pass(rag, ref, index, exact, on_cpu, qv, questions, min(depth, MAX_TOP_K),
                                         progress)
        finally:
            if ref is not None:  # (shielded: a caller gone mid-report still has it closed)
                await asyncio.shield(asyncio.to_thread(ref.close))
        seconds["latency_pass"] = time.perf_counter() - t
        top_k = top_k or rag.config.query.top_k
        answer_metrics = rows = stages = None
        if answers:
            t = time.perf_counter()
            results = await answer_all(rag, questions, concurrency, progress, cache_read=False,
                                       cache_write=False, top_k=top_k, model=model)
            rows = [score(q, r) for q, r in zip(questions, results)]
            answer_metrics = summarize(rows, time.perf_counter() - t)
            stages = stage_summary([r.timings for r in results if not isinstance(r, Exception)])
            seconds["answers"] = time.perf_counter() - t
        index_info = {
            "path": str(manifest.folder), "reused": reused, "type": index.index_type,
            "params": dict(index.spec.params), "search": dict(index.search_params),
            "auto": manifest.data.get("index", {}).get("auto", ""), "chunks": index.ntotal,
            "bytes": manifest.data.get("files", {}).get("index.faiss", {}).get("bytes"),
            "fingerprint": manifest.fingerprint, "depth": depth, "exact_from": exact_from}
    finally:
        rag.served.release(snap)
    seconds["total"] = time.perf_counter() - (t0 if started is None else started)
    labelled = [i for i, q in enumerate(questions) if any(r > 0 for r in q.relevant.values())]
    top_single = [row[0] if row else None for row in timing["single_top"]]
    return EvalReport(
        dataset=dataset, index=index_info,
        config={"top_k": top_k, "concurrency": concurrency, "model": model},
        served=_metrics(served_ranked, questions, labelled, timing["served"], timing["served_retrieve"]),
        exact=(_metrics(exact_ranked, questions, labelled, timing["exact"], timing["exact_retrieve"])
               if exact_ranked is not None else None),
        agreement10=(float(np.mean([overlap_at(a, b, DEPTH) for a, b in zip(served_ranked, exact_ranked)]))
                     if exact_ranked is not None and questions else None),
        single_matches_batched=(float(np.mean([s == (b[0] if b else None)
                                               for s, b in zip(top_single, served_ranked)]))
                                if questions else 0.0),
        answers=answer_metrics, stages=stages, seconds={k: round(v, 3) for k, v in seconds.items()},
        per_question=_per_question(questions, served_ranked, exact_ranked, rows),
    )


def run_blocking(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to the end from blocking code: on a new event loop, or on a helper
    thread's when this thread already runs one (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, work).result()


def stage_summary(timings: Sequence[Timings]) -> dict[str, dict[str, float]]:
    """Every stage of ``Timings``, in its order: count, mean and p50/p95/p99 (ms) over the
    answers that ran it (the engine's own ``StageStats.summary`` over these answers only),
    zeros with count 0 when none did. Every stage is listed, whatever ran: the keys do not
    depend on timings (an admission wait of 0.000 ms) or on which tiers were asked."""
    stats = StageStats(window=max(1, len(timings)))
    for t in timings:
        stats.record({stage: ms for stage, ms in t.as_dict().items() if ms})
    ran = stats.summary()
    none = {"count": 0, "mean_ms": 0.0, "p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0}
    return {f.name: ran.get(f.name, dict(none)) for f in dataclasses.fields(Timings)}


# -- the exact reference ------------------------------------------------------------------

_remembered: dict[tuple[str, str], np.ndarray] = {}
"""The last re-embedded reference (one), by (index fingerprint, model identity)."""
_remember_lock = threading.Lock()


async def _reference_vectors(rag: Any, snap: Any, on_cpu: Any,
                             progress: ProgressFn | None) -> tuple[np.ndarray | None, str | None]:
    """The float32 vectors of every chunk (row i: chunk i) and where they came from."""
    manifest, docstore = snap.manifest, snap.docstore
    if VECTORS_FILE in manifest.data.get("files", {}):
        return np.load(manifest.folder / VECTORS_FILE, mmap_mode="r", allow_pickle=False), VECTORS_FILE
    n = len(docstore)
    if n > REEMBED_MAX:
        return None, None
    key = (manifest.fingerprint, str(rag.embedder.identity.get("identity", rag.embedder.identity)))
    with _remember_lock:
        if key in _remembered:
            return _remembered[key], "re-embedded"
    parts = []
    for start in range(0, n, _SLICE):
        ids = list(range(start, min(start + _SLICE, n)))
        parts.append(await on_cpu(_embed_chunks, rag.embedder, docstore, ids, rag.config.embed.batch_size))
        if progress:
            progress("reference", ids[-1] + 1, n)
    vectors = np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros((0, rag.embedder.dim)),
                                   dtype=np.float32)
    with _remember_lock:
        _remembered.clear()
        _remembered[key] = vectors
    return vectors, "re-embedded"


def _embed_chunks(embedder: Any, docstore: Any, ids: list[int], batch_size: int) -> np.ndarray:
    return embedder.encode([c.text for c in docstore.get_many(ids)], batch_size=batch_size)


class _Borrowed:
    """The served docstore, lent to the reference's ``RAG``: closing that one leaves it open."""

    def __init__(self, docstore: Any) -> None:
        self._docstore = docstore

    def __len__(self) -> int:
        return len(self._docstore)

    def get_many(self, ids: Sequence[int]) -> list[Any]:
        return self._docstore.get_many(ids)


# -- the passes ---------------------------------------------------------------------------

def _doc_ids(docstore: Any) -> list[str]:
    """Each chunk's document id, read a slice at a time (the texts are not kept)."""
    n, out = len(docstore), []
    for start in range(0, n, 4096):
        out.extend(c.doc_id for c in docstore.get_many(range(start, min(start + 4096, n))))
    return out


async def _embed_questions(on_cpu: Any, embedder: Any, questions: Sequence[EvalQuestion], batch_size: int,
                           progress: ProgressFn | None) -> np.ndarray:
    parts, step = [], batch_size * 4
    for start in range(0, len(questions), step):
        texts = [q.text for q in questions[start:start + step]]
        parts.append(await on_cpu(lambda t=texts: embedder.encode(t, batch_size=batch_size)))
        if progress:
            progress("questions", min(start + step, len(questions)), len(questions))
    if not parts:
        return np.zeros((0, embedder.dim), np.float32)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _ranked(rows: list[list[Any]], doc_of: list[str]) -> list[list[str]]:
    return [dedupe(doc_of[h.chunk_id] for h in row)[:DEPTH] for row in rows]


def _timed_search(index: Any, vector: np.ndarray, depth: int) -> float:
    t = time.perf_counter()
    index.search(vector, depth)
    return (time.perf_counter() - t) * 1e3


async def _latency_pass(rag: Any, ref: Any, index: Any, exact: Any, on_cpu: Any, qv: np.ndarray,
                        questions: Sequence[EvalQuestion], depth: int,
                        progress: ProgressFn | None) -> dict[str, list[Any]]:
    """A question ``aretrieve`` refuses (an empty one) is left out of the timings; its
    single-question top document is None."""
    out: dict[str, list[Any]] = {"served": [], "exact": [], "served_retrieve": [], "exact_retrieve": [],
                                 "single_top": []}
    sides = [("served", rag, index), ("exact", ref, exact)] if ref is not None else [("served", rag, index)]

    async def retrieve(r: Any, text: str) -> list[Any] | None:
        try:
            return await r.aretrieve(text, depth)
        except RagserveError:
            return None

    for q in questions[:_WARMUP]:  # first calls pay for lazy initialisation, not retrieval
        for _, r, _ in sides:
            await retrieve(r, q.text)
    for i, q in enumerate(questions):
        # Alternate which side goes first, so neither always runs on warmer caches.
        for name, r, idx in (sides if i % 2 == 0 else sides[::-1]):
            t = time.perf_counter()
            sources = await retrieve(r, q.text)
            if sources is not None:
                out[f"{name}_retrieve"].append((time.perf_counter() - t) * 1e3)
            if name == "served":
                out["single_top"].append([s.doc_id for s in sources or []])
            out[name].append(await on_cpu(_timed_search, idx, qv[i:i + 1], depth))
        if progress and (i + 1 == len(questions) or (i + 1) % 16 == 0):
            progress("latency", i + 1, len(questions))
    return out


def _metrics(ranked: list[list[str]], questions: Sequence[EvalQuestion], labelled: list[int],
             search_ms: list[float], retrieve_ms: list[float]) -> RetrievalMetrics:
    def mean(fn: Callable[..., float], k: int) -> float | None:
        if not labelled:
            return None
        return float(np.mean([fn(ranked[i], questions[i].relevant, k) for i in labelled]))

    return RetrievalMetrics(
        hit={k: mean(hit_at, k) for k in KS}, recall={k: mean(recall_at, k) for k in KS},
        mrr10=mean(mrr_at, 10), ndcg10=mean(ndcg_at, 10),
        search_ms=(percentile(search_ms, 50), percentile(search_ms, 95)),
        retrieve_ms=(percentile(retrieve_ms, 50), percentile(retrieve_ms, 95)),
    )


def _per_question(questions: Sequence[EvalQuestion], served: list[list[str]], exact: list[list[str]] | None,
                  answers: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    def rank(ranked: list[str] | None, q: EvalQuestion) -> int | None:
        if ranked is None:
            return None
        return next((i for i, d in enumerate(ranked, start=1) if q.relevant.get(d, 0) > 0), None)

    rows = [{"qid": q.qid, "rank": rank(s, q), "rank_exact": rank(exact[i] if exact else None, q)}
            for i, (q, s) in enumerate(zip(questions, served))]
    for row, a in zip(rows, answers or []):
        row.update({k: a[k] for k in ANSWER_ROW_KEYS})
    return rows
