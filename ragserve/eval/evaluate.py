"""``ragserve eval``: retrieval quality and latency of an index type against exact fp32
search over the same embeddings, and optionally answer quality.

1. The data set's documents are indexed (``build_from_documents``) into an evaluation
   folder, or an earlier build is reused when its manifest matches (same documents digest,
   embedding model, chunking and requested index config) and every file still verifies.
2. The reference is an exact float32 ``IndexFlatIP`` over the float32 embeddings that the
   build computed (kept as ``vectors.f32.npy``). NOTE: not vectors reconstructed from the
   index: those are already rounded to float16, so the reference would share the error it
   is meant to measure.
3. Metrics pass: all questions embedded in batches once; both indexes searched with the
   same query vectors, so only the index differs.
4. Latency pass: one question at a time through ``rag.retrieve`` (embed + search + docload)
   for the served index and for the reference wrapped in a second ``RAG`` sharing the
   model, alternating which goes first; plus the search stage alone per query vector.
5. ``answers=True``: every question through ``rag.aquery`` on the real engine, scored by
   ``answer_eval`` (contains-gold, EM, F1, answer length, cut at max_tokens, empty).

``sample=N, seed=S`` measures ``random.Random(S).sample(questions in file order, N)``
(``answer_eval.sample_questions``): ``ragserve eval --answers --sample 200 --seed 1`` is the
protocol the prompt's defaults were chosen on.

**Usage:**

    report = evaluate("../shared/data/xquad-en/xquad.en.json")
    report.served.hit[1], report.exact.hit[1], report.to_dict()
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragserve.build.builder import VECTORS_FILE, build_from_documents
from ragserve.config import RAGConfig
from ragserve.errors import DatasetError, IndexError_, IndexMismatchError, IndexNotFoundError
from ragserve.eval.answers import ANSWER_ROW_KEYS, AnswerMetrics, answer_metrics, sample_questions
from ragserve.eval.datasets import EvalDataset, EvalQuestion, load_dataset
from ragserve.eval.scoring import dedupe, hit_at, mrr_at, ndcg_at, overlap_at, percentile, recall_at
from ragserve.index.manifest import read_manifest
from ragserve.index.verify import verify
from ragserve.retrieval.index_spec import plan_index, requested_build
from ragserve.types import Embedder

ProgressFn = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: build phases (``embed``, ``train``, ``add``), then
``questions``, ``latency`` and ``answers``."""

SCHEMA = "ragserve.eval/1"
KS = (1, 3, 10)
DEPTH = 10
_WARMUP = 3


@dataclass
class RetrievalMetrics:
    """Retrieval quality over all questions (means) and latency per single question (ms)."""

    hit: dict[int, float]
    recall: dict[int, float]
    mrr10: float
    ndcg10: float
    search_ms: tuple[float, float]
    """p50, p95 of the search stage alone, one query vector per call."""
    retrieve_ms: tuple[float, float]
    """p50, p95 of ``rag.retrieve``: embed + search + docload, one question per call."""


@dataclass
class EvalReport:
    dataset: dict[str, Any]
    index: dict[str, Any]
    served: RetrievalMetrics
    exact: RetrievalMetrics
    agreement10: float
    """Mean overlap of the served top-10 documents with the exact top-10 (ANN recall@10)."""
    single_matches_batched: float
    """Share of questions whose top document from ``rag.retrieve`` (one at a time) equals the
    metrics pass's (batched embedding): a check that both passes measure the same thing."""
    answers: AnswerMetrics | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    per_question: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` report. ``schema`` names its shape: keys are added under a
        schema, never renamed or removed (scripts read ``answers.contains`` etc.)."""
        return {"schema": SCHEMA, **dataclasses.asdict(self)}

    def rows(self) -> list[tuple[str, str, str]]:
        """(metric, served index, exact fp32) rows for a table."""
        s, e = self.served, self.exact
        rows = [(f"hit@{k}", f"{s.hit[k]:.3f}", f"{e.hit[k]:.3f}") for k in KS]
        rows += [(f"recall@{k}", f"{s.recall[k]:.3f}", f"{e.recall[k]:.3f}") for k in KS]
        rows += [("MRR@10", f"{s.mrr10:.3f}", f"{e.mrr10:.3f}"), ("nDCG@10", f"{s.ndcg10:.3f}", f"{e.ndcg10:.3f}"),
                 ("top-10 overlap with exact", f"{self.agreement10:.3f}", "1.000")]
        for name, attr in (("search", "search_ms"), ("rag.retrieve", "retrieve_ms")):
            a, b = getattr(s, attr), getattr(e, attr)
            rows.append((f"{name} ms p50 / p95", f"{a[0]:.2f} / {a[1]:.2f}", f"{b[0]:.2f} / {b[1]:.2f}"))
        return rows


def evaluate(
    dataset: Path | str | EvalDataset,
    index_dir: Path | str | None = None,
    config: RAGConfig | None = None,
    *,
    answers: bool = False,
    split: str = "test",
    rebuild: bool = False,
    max_questions: int | None = None,
    sample: int | None = None,
    seed: int = 1,
    embedder: Embedder | None = None,
    progress: ProgressFn | None = None,
) -> EvalReport:
    """Build or reuse an index over ``dataset`` and measure it against exact fp32 search.

    ``index_dir`` defaults to ``indexes/eval-<dataset>-<index type>``. The answer cache is
    turned off: every question is measured, none is answered from an earlier run.

    **Usage:** ``evaluate("xquad.en.json", config=RAGConfig().replace(index={"index_type": "hnsw-fp16"}))``
    """
    from ragserve.rag import RAG
    from ragserve.retrieval.docstore import LazyDocStore
    from ragserve.retrieval.faiss_index import FaissIndex

    t0 = time.perf_counter()
    ds = dataset if isinstance(dataset, EvalDataset) else load_dataset(dataset, split)
    if answers and not ds.has_answers:
        raise DatasetError(ds.path, "has no gold answers (a BEIR data set); run without --answers")
    config = (config or RAGConfig.load()).replace(cache={"enabled": False})
    folder = Path(index_dir) if index_dir else Path("indexes") / f"eval-{ds.name}-{config.index.index_type}"
    if embedder is None:
        from ragserve.retrieval.embed import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder(config.embed)
    embedder.warm_up()
    reused, vectors, build_s = prepare_index(ds, folder, config, embedder, progress=progress, rebuild=rebuild)
    questions = sample_questions(ds.questions[:max_questions] if max_questions else ds.questions, sample, seed)
    seconds = {"build": build_s}
    with ExitStack() as stack:
        rag = stack.enter_context(RAG.from_index(folder, config, start_engine=answers, embedder=embedder))
        exact = FaissIndex.build(np.asarray(vectors, dtype=np.float32), "flat-fp32")
        ref = stack.enter_context(RAG(rag.manifest, exact, LazyDocStore(folder), embedder, None, config))
        doc_of = [c.doc_id for c in rag.docstore.get_many(range(len(rag.docstore)))]
        # A document may be split into several chunks: search deep enough that DEPTH distinct
        # documents remain after de-duplication.
        depth = min(rag.index.ntotal, DEPTH * math.ceil(len(doc_of) / max(1, len(set(doc_of)))))
        t = time.perf_counter()
        qv = _embed_questions(embedder, questions, config.embed.batch_size, progress)
        served_ranked = _ranked(rag.index.search(qv, depth), doc_of)
        exact_ranked = _ranked(exact.search(qv, depth), doc_of)
        seconds["metrics_pass"] = time.perf_counter() - t
        t = time.perf_counter()
        timing = _latency_pass(rag, ref, qv, questions, depth, progress)
        seconds["latency_pass"] = time.perf_counter() - t
        answer_metrics_ = per_answer = None
        if answers:
            t = time.perf_counter()
            answer_metrics_, per_answer = answer_metrics(rag, questions, progress=progress)
            seconds["answers"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    top_single = [row[0] if row else None for row in timing["single_top"]]
    return EvalReport(
        dataset={"name": ds.name, "kind": ds.kind, "path": str(ds.path), "documents": len(ds.documents),
                 "questions": len(questions), "sample": sample, "seed": seed if sample else None,
                 "notes": ds.notes},
        index={"path": str(folder), "reused": reused, "type": rag.index.index_type,
               "params": rag.index.spec.params, "search": rag.index.search_params,
               "auto": rag.manifest.data["index"].get("auto", ""), "chunks": rag.index.ntotal,
               "bytes": rag.manifest.data["files"]["index.faiss"]["bytes"],
               "fingerprint": rag.manifest.fingerprint, "depth": depth},
        served=_metrics(served_ranked, questions, timing["served"], timing["served_retrieve"]),
        exact=_metrics(exact_ranked, questions, timing["exact"], timing["exact_retrieve"]),
        agreement10=float(np.mean([overlap_at(a, b, DEPTH) for a, b in zip(served_ranked, exact_ranked)])),
        single_matches_batched=float(np.mean([s == (b[0] if b else None)
                                              for s, b in zip(top_single, served_ranked)])),
        answers=answer_metrics_, seconds={k: round(v, 3) for k, v in seconds.items()},
        per_question=_per_question(questions, served_ranked, exact_ranked, per_answer),
    )


def prepare_index(ds: EvalDataset, folder: Path, config: RAGConfig, embedder: Embedder, *,
                  progress: ProgressFn | None = None, rebuild: bool = False) -> tuple[bool, np.ndarray, float]:
    """Reuse the evaluation index at ``folder`` if it matches, else build it (atomically).

    Returns (reused, float32 vectors, build seconds). A folder that is not an evaluation
    index (another index, or other files) is never replaced: that is an error.
    """
    source = {"kind": f"eval:{ds.kind}", "name": ds.name, "sha256": ds.digest()}
    if folder.exists():
        _refuse_foreign(folder)
        if not rebuild and _matches(folder, source, config, embedder):
            return True, np.load(folder / VECTORS_FILE, mmap_mode="r", allow_pickle=False), 0.0
    t = time.perf_counter()
    report = build_from_documents(ds.documents, folder, config, embedder=embedder, progress=progress,
                                  source=source, keep_vectors=True)
    assert report.vectors is not None
    return False, report.vectors, time.perf_counter() - t


def _refuse_foreign(folder: Path) -> None:
    try:
        kind = str(read_manifest(folder).data.get("source", {}).get("kind", ""))
    except IndexNotFoundError:
        if any(folder.iterdir()):
            raise IndexMismatchError(folder, "exists and is not an index; pass another --index folder") from None
        return
    except IndexError_ as e:
        raise IndexMismatchError(folder, f"exists with an unreadable manifest ({e}); remove it or pass "
                                         "another --index folder") from None
    if not kind.startswith("eval:"):
        raise IndexMismatchError(folder, "is an index not built by `ragserve eval`; it is not replaced: "
                                         "pass another --index folder")


def _matches(folder: Path, source: dict[str, Any], config: RAGConfig, embedder: Embedder) -> bool:
    try:
        m = verify(folder).data
    except IndexError_:
        return False  # ours, but damaged: build it again
    # The plan is compared too, not only the request: "auto" may choose differently after
    # an upgrade. Query-time defaults (nprobe, efSearch) never force a rebuild.
    plan = plan_index(m["counts"]["chunks"], config.index)
    build_params = {k: v for k, v in plan.params.items() if k not in ("nprobe", "ef_search")}
    return (m.get("source") == source and VECTORS_FILE in m["files"]
            and m["embedding"].get("identity") == embedder.identity.get("identity")
            and m["chunking"]["chunk_size"] == config.chunk.chunk_size
            and m["chunking"]["chunk_overlap"] == config.chunk.chunk_overlap
            and m["index"].get("requested") == requested_build(config.index)
            and m["index"]["type"] == plan.index_type
            and all(m["index"].get("params", {}).get(k) == v for k, v in build_params.items()))


def _embed_questions(embedder: Embedder, questions: Sequence[EvalQuestion], batch_size: int,
                     progress: ProgressFn | None) -> np.ndarray:
    parts, step = [], batch_size * 4
    for start in range(0, len(questions), step):
        parts.append(embedder.encode([q.text for q in questions[start:start + step]], batch_size=batch_size))
        if progress:
            progress("questions", min(start + step, len(questions)), len(questions))
    return np.concatenate(parts)


def _ranked(rows: list[list[Any]], doc_of: list[str]) -> list[list[str]]:
    return [dedupe(doc_of[h.chunk_id] for h in row)[:DEPTH] for row in rows]


def _latency_pass(rag: Any, ref: Any, qv: np.ndarray, questions: Sequence[EvalQuestion], depth: int,
                  progress: ProgressFn | None) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"served": [], "exact": [], "served_retrieve": [], "exact_retrieve": [],
                                 "single_top": []}
    for q in questions[:_WARMUP]:  # first calls pay for lazy initialisation, not retrieval
        rag.retrieve(q.text, top_k=depth)
        ref.retrieve(q.text, top_k=depth)
    for i, q in enumerate(questions):
        # Alternate which side goes first, so neither always runs on warmer caches.
        order = (("served", rag), ("exact", ref)) if i % 2 == 0 else (("exact", ref), ("served", rag))
        for name, r in order:
            t = time.perf_counter()
            sources = r.retrieve(q.text, top_k=depth)
            out[f"{name}_retrieve"].append((time.perf_counter() - t) * 1e3)
            if name == "served":
                out["single_top"].append([s.doc_id for s in sources])
            t = time.perf_counter()
            r.index.search(qv[i:i + 1], depth)
            out[name].append((time.perf_counter() - t) * 1e3)
        if progress and (i + 1 == len(questions) or (i + 1) % 16 == 0):
            progress("latency", i + 1, len(questions))
    return out


def _metrics(ranked: list[list[str]], questions: Sequence[EvalQuestion], search_ms: list[float],
             retrieve_ms: list[float]) -> RetrievalMetrics:
    def mean(fn: Callable[..., float], k: int) -> float:
        return float(np.mean([fn(r, q.relevant, k) for r, q in zip(ranked, questions)]))

    return RetrievalMetrics(
        hit={k: mean(hit_at, k) for k in KS}, recall={k: mean(recall_at, k) for k in KS},
        mrr10=mean(mrr_at, 10), ndcg10=mean(ndcg_at, 10),
        search_ms=(percentile(search_ms, 50), percentile(search_ms, 95)),
        retrieve_ms=(percentile(retrieve_ms, 50), percentile(retrieve_ms, 95)),
    )


def _per_question(questions: Sequence[EvalQuestion], served: list[list[str]], exact: list[list[str]],
                  answers: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    def rank(ranked: list[str], q: EvalQuestion) -> int | None:
        return next((i for i, d in enumerate(ranked, start=1) if q.relevant.get(d, 0) > 0), None)

    rows = [{"qid": q.qid, "rank": rank(s, q), "rank_exact": rank(e, q)} for q, s, e in zip(questions, served, exact)]
    for row, a in zip(rows, answers or []):
        row.update({k: a[k] for k in ANSWER_ROW_KEYS})
    return rows
