"""``ragserve eval``: retrieval quality and latency of an index type against exact fp32
search over the same embeddings, and optionally answer quality.

1. The data set's documents are indexed (``build_from_documents``) into an evaluation
   folder, or an earlier build is reused when its manifest matches (same documents digest,
   embedding model, chunking and requested index config) and every file still verifies.
   A questions file (``datasets.load_questions``: questions without documents, the body of
   ``POST /admin/eval``) is asked of an existing index instead (``index_dir``), as served.
2. ``report.build_report`` measures it, the one report builder ``POST /admin/eval`` uses
   too: the exact reference (the build's kept float32 vectors), the metrics pass, the
   latency pass and, with ``answers=True``, every question answered and scored.

``sample=N, seed=S`` measures ``random.Random(S).sample(questions in file order, N)``
(``answer_eval.sample_questions``): ``ragserve eval --answers --sample 200 --seed 1`` is the
protocol the prompt's defaults were chosen on.

**Usage:**

    report = evaluate("../shared/data/xquad-en/xquad.en.json")
    report.served.hit[1], report.exact.hit[1], report.to_dict()
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ragserve.build.builder import VECTORS_FILE, build_from_documents
from ragserve.config import RAGConfig
from ragserve.errors import DatasetError, IndexError_, IndexMismatchError, IndexNotFoundError
from ragserve.eval.answers import answer_metrics, sample_questions
from ragserve.eval.datasets import EvalDataset, load_dataset
from ragserve.eval.report import (
    DEPTH,
    KS,
    SCHEMA,
    EvalReport,
    ProgressFn,
    RetrievalMetrics,
    build_report,
    dataset_info,
    run_blocking,
)
from ragserve.index.manifest import read_manifest
from ragserve.index.verify import verify
from ragserve.retrieval.index_spec import plan_index, requested_build
from ragserve.types import Embedder

__all__ = ["DEPTH", "KS", "SCHEMA", "EvalReport", "RetrievalMetrics", "answer_metrics", "evaluate", "prepare_index"]


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
    top_k: int | None = None,
    concurrency: int = 16,
    model: str | None = None,
    embedder: Embedder | None = None,
    progress: ProgressFn | None = None,
) -> EvalReport:
    """Build or reuse an index over ``dataset`` and measure it against exact fp32 search
    (a questions file: measure the existing index at ``index_dir``).

    ``index_dir`` defaults to ``indexes/eval-<dataset>-<index type>``. The answer cache is
    bypassed: every question is measured, none is answered from an earlier run. ``top_k``
    (default ``query.top_k``) and ``concurrency``: the answers', as ``POST /admin/eval``'s
    configurations set them. ``model``: which of ``[models]`` answers (None: what a request
    naming none gets); one not configured is refused before any index is built or engine
    started (``ModelsConfig.check``, as ``ragserve query --model`` does).

    **Usage:** ``evaluate("xquad.en.json", config=RAGConfig().replace(index={"index_type": "hnsw-fp16"}))``
    """
    from ragserve.rag import RAG

    t0 = time.perf_counter()
    ds = dataset if isinstance(dataset, EvalDataset) else load_dataset(dataset, split)
    if answers and not ds.has_answers:
        raise DatasetError(ds.path, "has no gold answers (a BEIR data set); run without --answers")
    config = (config or RAGConfig.load()).replace(cache={"enabled": False})
    config.models.check(model)
    if ds.kind == "questions":
        if index_dir is None:
            raise DatasetError(ds.path, "is a questions file without documents: pass the index to ask with --index")
        folder = Path(index_dir)
        if not folder.is_dir():
            raise IndexNotFoundError(folder)
    else:
        folder = Path(index_dir) if index_dir else Path("indexes") / f"eval-{ds.name}-{config.index.index_type}"
    if embedder is None:
        from ragserve.retrieval.embed import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder(config.embed)
    embedder.warm_up()
    reused, build_s = True, 0.0
    if ds.kind != "questions":
        reused, _, build_s = prepare_index(ds, folder, config, embedder, progress=progress, rebuild=rebuild)
    questions = sample_questions(ds.questions[:max_questions] if max_questions else ds.questions, sample, seed)
    info = dataset_info(ds.name, ds.kind, len(questions), path=str(ds.path),
                        documents=None if ds.kind == "questions" else len(ds.documents),
                        labelled=sum(any(r > 0 for r in q.relevant.values()) for q in questions),
                        sample=sample, seed=seed, notes=ds.notes)
    with RAG.from_index(folder, config, start_engine=answers, embedder=embedder) as rag:
        return run_blocking(build_report(rag, questions, dataset=info, answers=answers, top_k=top_k,
                                         concurrency=concurrency, model=model, reused=reused,
                                         seconds={"build": build_s}, started=t0, progress=progress))


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
