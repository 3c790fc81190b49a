"""``build_index``: corpus → chunks → embeddings → FAISS + docstore + manifest.

The build writes into a temporary folder beside the destination and renames it into
place only when every file and the manifest are complete, so a crash or Ctrl-C leaves
the previous index untouched. An existing index is moved aside first and removed only
after the new one is in place.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragserve._version import __version__
from ragserve.config import RAGConfig
from ragserve.docstore import CHUNKS_FILE, OFFSETS_FILE, write_docstore
from ragserve.errors import ConfigError, IngestError
from ragserve.index import INDEX_FILE, FaissIndex
from ragserve.index_spec import plan_index
from ragserve.ingest import Document, FileOutcome, chunk_documents, read_corpus
from ragserve.manifest import write_manifest
from ragserve.types import Embedder

ProgressFn = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phases ``embed`` (chunks), ``train`` (IVF k-means
iterations) and ``add`` (vectors added to the index)."""

VECTORS_FILE = "vectors.f32.npy"
"""float32 embeddings, written only on request (``keep_vectors``): the exact reference."""


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

    @property
    def files_read(self) -> int:
        return sum(1 for f in self.files if f.status == "ok")

    @property
    def skipped(self) -> list[FileOutcome]:
        return [f for f in self.files if f.status == "skipped"]


def build_index(
    source: Path | str,
    out: Path | str,
    config: RAGConfig | None = None,
    *,
    embedder: Embedder | None = None,
    encoding: str | None = None,
    progress: ProgressFn | None = None,
) -> BuildReport:
    """Build an index folder at ``out`` from a file or folder of documents.

    **Usage:** ``build_index("docs/", "indexes/docs")``
    """
    config = config or RAGConfig.load()
    t0 = time.perf_counter()
    docs, outcomes = read_corpus(Path(source), encoding, int(config.chunk.max_file_mb * 2**20))
    if not docs:
        reasons = "; ".join(f"{o.path}: {o.reason}" for o in outcomes[:5]) or "the folder is empty"
        raise IngestError(f"{source}: no readable documents ({reasons})")
    return build_from_documents(docs, out, config, embedder=embedder, outcomes=outcomes, progress=progress,
                                _started=t0)


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
    _started: float | None = None,
) -> BuildReport:
    """Chunk, embed and index documents already in memory (``ragserve eval`` builds from a
    data set's paragraphs this way); the folder is written and swapped in as by ``build_index``.

    ``source`` is recorded in the manifest (what the documents came from, with a digest);
    ``keep_vectors`` also writes the float32 embeddings (``vectors.f32.npy``, hashed in the
    manifest like every file) and returns them in the report: the exact reference of an
    evaluation needs the vectors before float16 rounding.

    **Usage:** ``build_from_documents([Document("a", "text")], "indexes/a", keep_vectors=True)``
    """
    config = config or RAGConfig.load()
    out = Path(out)
    t0 = _started if _started is not None else time.perf_counter()
    timings: dict[str, float] = {"read": time.perf_counter() - t0}
    if outcomes is None:
        outcomes = [FileOutcome(d, "ok", documents=1) for d in dict.fromkeys(doc.doc_id for doc in docs)]
    if embedder is None:
        from ragserve.embed import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder(config.embed)
    embedder.warm_up()
    max_len = getattr(embedder, "max_seq_length", None)
    if max_len and config.chunk.chunk_size > max_len:
        raise ConfigError(
            "chunk.chunk_size",
            f"{config.chunk.chunk_size} tokens is more than the embedding model reads ({max_len}); "
            f"use --chunk-size {max_len} or less",
        )

    t = time.perf_counter()
    counter = getattr(embedder, "token_counter", None)
    unchunked: dict[str, str] = {}  # a document that cannot be chunked is skipped, not the build
    chunks = list(chunk_documents(docs, config.chunk.chunk_size, config.chunk.chunk_overlap,
                                  counter() if counter else None, on_skip=unchunked.__setitem__))
    timings["chunk"] = time.perf_counter() - t
    per_file: dict[str, int] = {}
    for c in chunks:
        per_file[c.doc_id] = per_file.get(c.doc_id, 0) + 1
    outcomes = [
        FileOutcome(o.path, "skipped" if o.path in unchunked and not per_file.get(o.path) else o.status,
                    unchunked.get(o.path, o.reason), o.encoding, o.documents, per_file.get(o.path, 0))
        for o in outcomes
    ]
    if not chunks:
        raise IngestError(f"no chunks: {'; '.join(f'{k}: {v}' for k, v in list(unchunked.items())[:5])}")

    t = time.perf_counter()
    vectors = _embed_all(embedder, [c.text for c in chunks], config.embed.batch_size, progress)
    timings["embed"] = time.perf_counter() - t

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t = time.perf_counter()
        spec = plan_index(len(vectors), config.index)
        index = FaissIndex.build(vectors, spec, progress=progress)
        timings["index"] = time.perf_counter() - t
        t = time.perf_counter()
        index.save(tmp)
        write_docstore(tmp, chunks)
        files = [INDEX_FILE, CHUNKS_FILE, OFFSETS_FILE]
        if keep_vectors:
            np.save(tmp / VECTORS_FILE, vectors, allow_pickle=False)
            files.append(VECTORS_FILE)
        timings["write"] = time.perf_counter() - t
        body = _manifest_body(config, embedder, outcomes, docs, chunks, index)
        if source is not None:
            body["source"] = source
        manifest = write_manifest(tmp, body, files)
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    timings["total"] = time.perf_counter() - t0
    return BuildReport(
        out=out, files=outcomes, chunks=len(chunks), documents=len(docs), dim=index.dim,
        index_type=index.index_type, index_bytes=manifest["files"][INDEX_FILE]["bytes"],
        fp32_bytes=len(chunks) * index.dim * 4, fingerprint=manifest["fingerprint"],
        seconds={k: round(v, 3) for k, v in timings.items()}, index_params=spec.params,
        index_reason=spec.reason, vectors=vectors if keep_vectors else None,
    )


def _embed_all(embedder: Embedder, texts: list[str], batch_size: int, progress: ProgressFn | None) -> np.ndarray:
    # Batches of a few model batches, so the progress bar moves while the model sorts
    # each slice by length (what sentence-transformers' own encode does).
    step = batch_size * 8
    parts = []
    for start in range(0, len(texts), step):
        parts.append(embedder.encode(texts[start:start + step], batch_size=batch_size))
        if progress:
            progress("embed", min(start + step, len(texts)), len(texts))
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)


def _manifest_body(config, embedder, outcomes, docs, chunks, index) -> dict[str, Any]:
    return {
        "ragserve_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "embedding": {**embedder.identity, "model": str(getattr(embedder, "path", config.embed.model)),
                      "dim": index.dim, "normalized": True,
                      "precision": getattr(embedder, "precision", "float32"),
                      "max_seq_length": getattr(embedder, "max_seq_length", None)},
        "chunking": {"splitter": "llama_index.core.node_parser.SentenceSplitter",
                     "chunk_size": config.chunk.chunk_size, "chunk_overlap": config.chunk.chunk_overlap,
                     "tokenizer": "embedding model"},
        "index": {**index.spec.to_manifest(), "ntotal": index.ntotal},
        "counts": {"files_read": sum(o.status == "ok" for o in outcomes),
                   "files_skipped": sum(o.status == "skipped" for o in outcomes),
                   "documents": len(docs), "chunks": len(chunks)},
        "skipped": [{"path": o.path, "reason": o.reason} for o in outcomes if o.status == "skipped"],
    }


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished build into place; the old index is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
