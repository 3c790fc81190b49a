"""``build_index``: corpus → chunks → embeddings → FAISS + docstore + manifest, incrementally.

When the index at ``out`` was built with the same embedding model and chunking, only the
files whose SHA-256 changed (or that are new) are read, chunked and embedded; the chunks
and vectors of unchanged files are taken from the previous index, and deleted files drop
out (``incremental.py`` has the plan and the chunk-id order that makes the result equal
to a full build). ``full=True``, another model or other chunking build everything.

Every build writes a new version folder and flips ``out`` to it atomically
(``index/versions.py``): a crash or Ctrl-C at any point leaves the previous index or the new
one at ``out``, never neither, and a server that has the previous one open keeps it.

A build is three steps: ``start_build`` (plan, load the model), reading and chunking
(``gather`` in this process, or Ray tasks in ``ray/build.py``) and ``finish_build``
(embed the new chunks, take the rest from the previous index, index, publish).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ragserve.build.incremental import BuildPlan, Gathered, gather, plan_build, scan_source
from ragserve.build.ingest import Document, FileOutcome, chunk_documents
from ragserve.build.textfile import check_encoding
from ragserve.config import RAGConfig
from ragserve.errors import ConfigError, IngestError
from ragserve.index.contents import check_reused
from ragserve.index.writer import VECTORS_FILE, chunking_section, embedding_section, publish_index_folder
from ragserve.retrieval.faiss_index import INDEX_FILE, FaissIndex, quantizer_fit
from ragserve.retrieval.index_spec import IndexSpec, drift, plan_index, requested_build, reuse_ivf_quantizer
from ragserve.types import Chunk, Embedder

ProgressFn = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phases ``hash`` (source files), ``embed`` (chunks),
``train`` (IVF k-means iterations) and ``add`` (vectors added to the index)."""

__all__ = ["VECTORS_FILE", "BuildReport", "PlannedBuild", "build_from_documents", "build_index",
           "embed_slices", "embed_texts", "embedding_record", "finish_build", "gathered_vectors", "open_previous",
           "plan_build_index", "ready_embedder", "start_build"]


@dataclass
class BuildReport:
    out: Path
    files: list[FileOutcome]
    chunks: int
    documents: int
    dim: int
    index_type: str
    index_bytes: int
    fp32_bytes: int
    fingerprint: str
    seconds: dict[str, float] = field(default_factory=dict)
    index_params: dict[str, int] = field(default_factory=dict)
    index_reason: str = ""
    """Why ``auto`` chose the type (empty when it was named)."""
    vectors: np.ndarray | None = field(default=None, repr=False)
    """The float32 embeddings, when the build was asked to keep them."""
    mode: str = "full"
    """"full", "incremental", or "up to date" (nothing changed: no new version written)."""
    reason: str = ""
    """Why the build was full."""
    changes: dict[str, int] = field(default_factory=dict)
    """Source files unchanged / changed / added / deleted since the previous index."""
    embedded: int = 0
    """Chunks embedded by this build (the rest were taken from the previous index)."""
    quantizer: dict[str, Any] | None = None
    """IVF: whether the coarse quantizer was trained or reused, and why."""
    version: Path | None = None
    """The real folder ``out`` now names."""
    cluster: dict[str, Any] = field(default_factory=dict)
    """Ray builds (``ray/build.py``): the cluster, read tasks and per-actor work; else empty."""
    shards: list[dict[str, Any]] = field(default_factory=list)
    """Sharded builds (``sharded.py``): per shard its name, chunks, fingerprint and whether
    it was rebuilt or linked unchanged from the previous version; else empty."""

    @property
    def files_read(self) -> int:
        return sum(1 for f in self.files if f.status == "ok")

    @property
    def skipped(self) -> list[FileOutcome]:
        return [f for f in self.files if f.status == "skipped"]


def plan_build_index(source: Path | str, out: Path | str, config: RAGConfig | None = None, *,
                     embedder: Embedder | None = None, encoding: str | None = None, full: bool = False,
                     progress: ProgressFn | None = None) -> BuildPlan:
    """What ``build_index`` would do, without writing anything or loading the model:
    full or incremental (and why), and the files unchanged, changed, added and deleted.

    **Usage:** ``print(plan_build_index("docs/", "indexes/docs").describe())``
    """
    config = config or RAGConfig.load()
    check_encoding(encoding)
    identity = embedder.identity if embedder is not None else _embedder(config).identity
    files = scan_source(source, progress)
    return plan_build(files, Path(out), identity=identity, chunking=chunking_section(config.chunk),
                      encoding=encoding, full=full)


def build_index(
    source: Path | str,
    out: Path | str,
    config: RAGConfig | None = None,
    *,
    embedder: Embedder | None = None,
    encoding: str | None = None,
    progress: ProgressFn | None = None,
    full: bool = False,
) -> BuildReport:
    """Build or update the index at ``out`` from a file or folder of documents.

    **Usage:** ``build_index("docs/", "indexes/docs")``; ``full=True`` re-embeds everything.
    An index in shards (``index.shards``) is built by ``sharded.build_sharded``, which builds
    on this module; given such a config, this refuses rather than drop the setting.
    """
    if config is not None and config.index.shards:
        raise ConfigError("index.shards", f"is {config.index.shards}: build a sharded index with "
                          "ragserve.build.sharded.build_sharded (or `build-index --shards`)")
    build = start_build(source, out, config, embedder=embedder, encoding=encoding, progress=progress,
                        full=full)
    t = time.perf_counter()
    g = gather(build.plan, **build.read_options())
    build.timings["read"] = time.perf_counter() - t
    return finish_build(build, g, progress=progress)


@dataclass
class PlannedBuild:
    """A build between planning and reading (``start_build``): the plan, the loaded model
    and the chunking settings. ``build_index`` reads with ``gather``; ``ray/build.py`` reads
    in Ray tasks; both then call ``finish_build``."""

    source: Path | str
    out: Path
    config: RAGConfig
    embedder: Embedder
    plan: BuildPlan
    tokenizer: Any
    """The chunker's token counter: the embedding model's own tokenizer."""
    encoding: str | None
    timings: dict[str, float]
    t0: float

    def read_options(self) -> dict[str, Any]:
        """``gather``'s keyword arguments (how files are read and chunked)."""
        c = self.config.chunk
        return {"chunk_size": c.chunk_size, "chunk_overlap": c.chunk_overlap, "tokenizer": self.tokenizer,
                "encoding": self.encoding, "max_bytes": int(c.max_file_mb * 2**20)}


def start_build(source: Path | str, out: Path | str, config: RAGConfig | None = None, *,
                embedder: Embedder | None = None, encoding: str | None = None,
                progress: ProgressFn | None = None, full: bool = False) -> PlannedBuild:
    """Plan the build (hash the source, compare with ``out``) and load the embedding model,
    checking the chunk size against it. Nothing is read or written yet."""
    config = config or RAGConfig.load()
    check_encoding(encoding)  # before the model loads
    t0 = time.perf_counter()
    embedder = embedder or _embedder(config)
    plan = plan_build_index(source, out, config, embedder=embedder, encoding=encoding, full=full, progress=progress)
    timings = {"scan": time.perf_counter() - t0}
    t = time.perf_counter()
    tokenizer = _ready(embedder, config)
    timings["model"] = time.perf_counter() - t
    return PlannedBuild(source, Path(out), config, embedder, plan, tokenizer, encoding, timings, t0)


def finish_build(build: PlannedBuild, g: Gathered, *, progress: ProgressFn | None = None,
                 embed: Callable[[list[str]], np.ndarray] | None = None) -> BuildReport:
    """Embed the new chunks of ``g``, take the rest from the previous index, build the
    FAISS index and publish it. ``embed`` turns the new chunks' texts into vectors in
    order (default: ``build.embedder`` in this process, ``embed_slices`` at a time);
    nothing is written when no file could be read or nothing changed."""
    plan, out, config, timings = build.plan, build.out, build.config, build.timings
    if not any(o.status == "ok" for o in g.outcomes):
        reasons = "; ".join(f"{o.path}: {o.reason}" for o in g.outcomes[:5]) or "the folder is empty"
        raise IngestError(f"{build.source}: no readable documents ({reasons})")
    if _up_to_date(plan, g.outcomes, config) and out.is_symlink():  # a plain folder is migrated below
        return _unchanged_report(plan, out, g.outcomes, timings, build.t0)
    previous = _open_previous(plan) if plan.previous is not None else None
    t = time.perf_counter()
    vectors = gathered_vectors(plan, g, previous, build.embedder, config, progress=progress, embed=embed)
    timings["embed"] = time.perf_counter() - t
    build_record = {"mode": plan.mode, "reason": plan.reason, "files": plan.counts,
                    "chunks_embedded": len(g.new_ids), "chunks_kept": len(g.chunks) - len(g.new_ids),
                    "previous": plan.previous.fingerprint if plan.previous is not None else None}
    extra = {"corpus": {"encoding": build.encoding, "files": g.corpus}, "build": build_record}
    report = _index_and_publish(out, g.chunks, vectors, g.outcomes, g.documents, config, build.embedder,
                                extra=extra, plan=plan, previous=previous, progress=progress, timings=timings)
    report.seconds["total"] = round(time.perf_counter() - build.t0, 3)
    report.mode, report.reason, report.changes, report.embedded = plan.mode, plan.reason, plan.counts, len(g.new_ids)
    return report


def gathered_vectors(plan: BuildPlan, g: Gathered, previous: FaissIndex | None, embedder: Embedder,
                     config: RAGConfig, *, progress: ProgressFn | None = None,
                     embed: Callable[[list[str]], np.ndarray] | None = None) -> np.ndarray:
    """The vectors of ``g``'s chunks in chunk-id order: the kept ones read back (and
    checked) from ``previous`` (the plan's previous index, mapped), the new ones embedded
    (``embed``, or ``embedder`` in ``embed_slices``)."""
    vectors = np.empty((len(g.chunks), embedder.dim), np.float32)
    _reuse(plan, previous, g.kept, vectors)
    texts = [g.chunks[i].text for i in g.new_ids]
    vectors[g.new_ids] = (embed(texts) if embed is not None
                          else _embed_all(embedder, texts, config.embed.batch_size, progress))
    return vectors


def open_previous(plan: BuildPlan) -> FaissIndex | None:
    """The plan's previous index, mapped (None for a full plan)."""
    return _open_previous(plan) if plan.previous is not None else None


def ready_embedder(config: RAGConfig, embedder: Embedder | None = None) -> tuple[Embedder, Any]:
    """The embedder (``config``'s model unless given), loaded and checked against the chunk
    size, and the chunker's token counter."""
    embedder = embedder or _embedder(config)
    return embedder, _ready(embedder, config)


def embedding_record(embedder: Embedder, config: RAGConfig, dim: int) -> dict[str, Any]:
    """The manifest's ``embedding`` section for vectors of ``embedder``."""
    return embedding_section(embedder.identity, getattr(embedder, "path", config.embed.model), dim,
                             precision=getattr(embedder, "precision", "float32"),
                             max_seq_length=getattr(embedder, "max_seq_length", None))


def embed_texts(embedder: Embedder, texts: list[str], batch_size: int,
                progress: ProgressFn | None = None) -> np.ndarray:
    """Embed ``texts`` in order, ``embed_slices`` at a time (what every build path does)."""
    return _embed_all(embedder, texts, batch_size, progress)


def build_from_documents(
    docs: list[Document],
    out: Path | str,
    config: RAGConfig | None = None,
    *,
    embedder: Embedder | None = None,
    outcomes: list[FileOutcome] | None = None,
    progress: ProgressFn | None = None,
    source: dict[str, Any] | None = None,
    keep_vectors: bool = False,
) -> BuildReport:
    """Chunk, embed and index documents already in memory (``ragserve eval`` builds from a
    data set's paragraphs this way): always a full build, published like ``build_index``'s.

    ``source`` is recorded in the manifest (what the documents came from, with a digest);
    ``keep_vectors`` also writes the float32 embeddings (``vectors.f32.npy``, hashed in the
    manifest like every file) and returns them in the report: the exact reference of an
    evaluation needs the vectors before float16 rounding.

    **Usage:** ``build_from_documents([Document("a", "text")], "indexes/a", keep_vectors=True)``
    """
    config = config or RAGConfig.load()
    out = Path(out)
    t0 = time.perf_counter()
    # One document given twice (same id, text and metadata) is indexed once: its chunks would
    # be the same records twice, which opening refuses (a chunk served twice).
    docs = list({(d.doc_id, d.text, orjson.dumps(d.metadata, option=orjson.OPT_SORT_KEYS)): d for d in docs}.values())
    outcomes = outcomes or [FileOutcome(d, "ok", documents=1) for d in dict.fromkeys(doc.doc_id for doc in docs)]
    embedder = embedder or _embedder(config)
    tokenizer = _ready(embedder, config)
    t = time.perf_counter()
    unchunked: dict[str, str] = {}  # a document that cannot be chunked is skipped, not the build
    chunks = list(chunk_documents(docs, config.chunk.chunk_size, config.chunk.chunk_overlap, tokenizer,
                                  on_skip=unchunked.__setitem__))
    if not chunks:
        raise IngestError(f"no chunks: {'; '.join(f'{k}: {v}' for k, v in list(unchunked.items())[:5])}")
    per_file: dict[str, int] = {}
    for c in chunks:
        per_file[c.doc_id] = per_file.get(c.doc_id, 0) + 1
    outcomes = [FileOutcome(o.path, "skipped" if o.path in unchunked and not per_file.get(o.path) else o.status,
                            unchunked.get(o.path, o.reason), o.encoding, o.documents, per_file.get(o.path, 0))
                for o in outcomes]
    timings = {"chunk": time.perf_counter() - t}
    t = time.perf_counter()
    vectors = _embed_all(embedder, [c.text for c in chunks], config.embed.batch_size, progress)
    timings["embed"] = time.perf_counter() - t
    extra: dict[str, Any] = {"build": {"mode": "full", "reason": "built from documents in memory",
                                       "chunks_embedded": len(chunks)}}
    if source is not None:
        extra["source"] = source
    report = _index_and_publish(out, chunks, vectors, outcomes, len(docs), config, embedder, extra=extra,
                                keep_vectors=keep_vectors, progress=progress, timings=timings)
    report.seconds["total"] = round(time.perf_counter() - t0, 3)
    report.embedded = len(chunks)
    return report


def _index_and_publish(out: Path, chunks: list[Chunk], vectors: np.ndarray, outcomes: list[FileOutcome],
                       documents: int, config: RAGConfig, embedder: Embedder, *, extra: dict[str, Any],
                       plan: BuildPlan | None = None, previous: FaissIndex | None = None, keep_vectors: bool = False,
                       progress: ProgressFn | None = None, timings: dict[str, float]) -> BuildReport:
    """Build the FAISS index over ``vectors``, write a new version of ``out`` and switch to it.

    Nothing is written before this point: a build that fails while reading or embedding
    (the long part) leaves nothing behind.
    """
    t = time.perf_counter()
    spec = plan_index(len(vectors), config.index)
    spec, centroids, quantizer = _ivf_quantizer(spec, plan, previous, vectors, config)
    index = FaissIndex.build(vectors, spec, progress=progress, centroids=centroids)
    index_extra = None
    if quantizer is not None:
        if centroids is None:
            quantizer["fit"] = quantizer_fit(index.centroids(), vectors)  # type: ignore[arg-type]
        index_extra = {"quantizer": {"fit": quantizer["fit"]}}
        extra["build"]["quantizer"] = quantizer
    timings["index"] = time.perf_counter() - t
    t = time.perf_counter()
    embedding = embedding_record(embedder, config, index.dim)
    counts = {"files_read": sum(o.status == "ok" for o in outcomes),
              "files_skipped": sum(o.status == "skipped" for o in outcomes),
              "documents": documents, "chunks": len(chunks)}
    skipped = [{"path": o.path, "reason": o.reason} for o in outcomes if o.status == "skipped"]
    manifest, version = publish_index_folder(
        out, index, chunks=chunks, embedding=embedding, chunking=chunking_section(config.chunk), counts=counts,
        index_extra=index_extra, vectors=vectors if keep_vectors else None, extra={"skipped": skipped, **extra})
    timings["write"] = time.perf_counter() - t
    return BuildReport(
        out=out, files=outcomes, chunks=len(chunks), documents=documents, dim=index.dim,
        index_type=index.index_type, index_bytes=manifest["files"][INDEX_FILE]["bytes"],
        fp32_bytes=len(chunks) * index.dim * 4, fingerprint=manifest["fingerprint"],
        seconds={k: round(v, 3) for k, v in timings.items()}, index_params=spec.params,
        index_reason=spec.reason, vectors=vectors if keep_vectors else None, quantizer=quantizer, version=version,
    )


def _ivf_quantizer(spec: IndexSpec, plan: BuildPlan | None, previous: FaissIndex | None, vectors: np.ndarray,
                   config: RAGConfig) -> tuple[IndexSpec, np.ndarray | None, dict[str, Any] | None]:
    """IVF: reuse the previous centroids when they still fit the corpus, else train.

    Returns the spec to build, the centroids to reuse (None: train) and what the manifest
    and summary say about it (None for other index types).
    """
    if spec.index_type != "ivf-fp16":
        return spec, None, None
    if plan is None or plan.previous is None or previous is None:
        return spec, None, {"action": "trained", "reason": (plan.reason if plan else "") or "no previous centroids"}
    old_section = plan.previous.data["index"]
    reused, why = reuse_ivf_quantizer(old_section, spec, len(vectors), config.index)
    if reused is not None:
        centroids = previous.centroids()
        assert centroids is not None
        trained, now = float(old_section["quantizer"]["fit"]), quantizer_fit(centroids, vectors)
        why = drift(trained, now)
        if not why:
            return reused, centroids, {
                "action": "reused", "fit": trained, "fit_now": now,
                "reason": f"mean cosine to the nearest centroid {now:.3f} (at training {trained:.3f})"}
    return spec, None, {"action": "trained", "reason": why}


def _up_to_date(plan: BuildPlan, outcomes: list[FileOutcome], config: RAGConfig) -> bool:
    """Nothing to write: no file changed and the index would be built the same way."""
    if not plan.changes_nothing or plan.previous is None:
        return False
    data = plan.previous.data
    skipped = [{"path": o.path, "reason": o.reason} for o in outcomes if o.status == "skipped"]
    same_index = (data["index"].get("requested") == requested_build(config.index)
                  and data["index"]["type"] == plan_index(data["counts"]["chunks"], config.index).index_type)
    return same_index and data.get("skipped") == skipped


def _unchanged_report(plan: BuildPlan, out: Path, outcomes: list[FileOutcome], timings: dict[str, float],
                      t0: float) -> BuildReport:
    assert plan.previous is not None
    data = plan.previous.data
    timings["total"] = time.perf_counter() - t0
    spec = IndexSpec.from_manifest(data["index"])
    return BuildReport(
        out=out, files=outcomes, chunks=data["counts"]["chunks"], documents=data["counts"]["documents"],
        dim=int(data["embedding"]["dim"]), index_type=spec.index_type,
        index_bytes=data["files"][INDEX_FILE]["bytes"], fp32_bytes=data["counts"]["chunks"] * int(data["embedding"]["dim"]) * 4,
        fingerprint=plan.previous.fingerprint, seconds={k: round(v, 3) for k, v in timings.items()},
        index_params=spec.params, index_reason=spec.reason, mode="up to date", changes=plan.counts,
        version=plan.previous.folder,
    )


def _open_previous(plan: BuildPlan) -> FaissIndex:
    assert plan.previous is not None
    return FaissIndex.load(plan.previous.folder, IndexSpec.from_manifest(plan.previous.data["index"]))


def _reuse(plan: BuildPlan, previous: FaissIndex | None, kept: list[tuple[int, int, int]],
           vectors: np.ndarray) -> None:
    """Read the kept vectors back from the previous index into ``vectors``, and check
    every one of them (finite, of unit norm as its manifest says) before any is used."""
    runs = _runs(kept)
    if previous is None or plan.previous is None or not runs:
        return
    for new, old, count in runs:
        vectors[new:new + count] = previous.vectors(old, count)
    check_reused(plan.previous.folder, [(old, vectors[new:new + count]) for new, old, count in runs],
                 plan.previous.embedding.get("normalized") is True)


def _runs(kept: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Adjacent runs merged, so that a mostly unchanged corpus is read in a few calls."""
    merged: list[tuple[int, int, int]] = []
    for new, old, count in kept:
        if count == 0:
            continue
        if merged and merged[-1][0] + merged[-1][2] == new and merged[-1][1] + merged[-1][2] == old:
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + count)
        else:
            merged.append((new, old, count))
    return merged


def _embedder(config: RAGConfig) -> Embedder:
    from ragserve.retrieval.embed import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(config.embed)  # cheap: the model loads in warm_up


def _ready(embedder: Embedder, config: RAGConfig) -> Any:
    """Load the model, check the chunk size against it; returns the splitter's tokenizer."""
    embedder.warm_up()
    max_len = getattr(embedder, "max_seq_length", None)
    if max_len and config.chunk.chunk_size > max_len:
        raise ConfigError(
            "chunk.chunk_size",
            f"{config.chunk.chunk_size} tokens is more than the embedding model reads ({max_len}); "
            f"use --chunk-size {max_len} or less",
        )
    counter = getattr(embedder, "token_counter", None)
    return counter() if counter else None


def embed_slices(count: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the slices a build embeds at a time: a few model batches each,
    so that progress moves while the model sorts each slice by length (what
    sentence-transformers' own ``encode`` does). The vectors of a text depend on the slice
    it is embedded with (padding), so every build path embeds exactly these slices: that
    keeps a Ray build's float16 codes, hence its fingerprint, equal to a local build's."""
    step = batch_size * 8
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def _embed_all(embedder: Embedder, texts: list[str], batch_size: int,
               progress: ProgressFn | None) -> np.ndarray:
    parts = []
    for start, end in embed_slices(len(texts), batch_size):
        parts.append(embedder.encode(texts[start:end], batch_size=batch_size))
        if progress:
            progress("embed", end, len(texts))
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)
