"""The one way an index folder is written: full builds, incremental builds, ``ragserve
eval`` and ``benchmarks/bench_scale.py`` all call ``publish_index_folder`` (which writes the
folder with ``write_index_folder`` and publishes it as the new version, ``versions.py``).

A folder holds ``index.faiss``, the docstore (``chunks.jsonl`` + ``chunks.offsets.npy``),
optionally the float32 vectors (``vectors.f32.npy``), and ``manifest.json`` written last
with the SHA-256 of every file. The caller gives the parts that differ between builds
(embedding, chunking, counts, and extra sections such as ``corpus`` or ``source``); the
common ones (version, creation time, index section) are filled in here, so every folder
has the same shape whoever wrote it.

**Usage:**

    manifest, version = publish_index_folder(Path("indexes/docs"), index, chunks=chunks,
                                             embedding=embedding_section(...),
                                             chunking=chunking_section(config.chunk), counts={...})
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ragserve._version import __version__
from ragserve.config import ChunkConfig
from ragserve.index.manifest import write_manifest
from ragserve.index.versions import build_folder, publish
from ragserve.retrieval.docstore import CHUNKS_FILE, OFFSETS_FILE, write_docstore
from ragserve.retrieval.faiss_index import INDEX_FILE, FaissIndex
from ragserve.types import Chunk

VECTORS_FILE = "vectors.f32.npy"
"""float32 embeddings, written only on request: the exact reference of an evaluation."""

SPLITTER = "llama_index.core.node_parser.SentenceSplitter"


def embedding_section(identity: dict[str, Any], model: str | Path, dim: int, *, precision: str | None = None,
                      max_seq_length: int | None = None) -> dict[str, Any]:
    """The manifest's ``embedding`` section: which model made the vectors (its identity is
    what ``check_embedding`` and incremental builds compare)."""
    section: dict[str, Any] = {**identity, "model": str(model), "dim": dim, "normalized": True}
    if precision is not None:
        section["precision"] = precision
        section["max_seq_length"] = max_seq_length
    return section


def chunking_section(chunk: ChunkConfig) -> dict[str, Any]:
    """The manifest's ``chunking`` section: an incremental build reuses chunks only when
    this is equal, because any field here changes where chunks begin and end."""
    return {"splitter": SPLITTER, "chunk_size": chunk.chunk_size, "chunk_overlap": chunk.chunk_overlap,
            "tokenizer": "embedding model"}


def write_index_folder(
    folder: Path,
    index: FaissIndex,
    *,
    embedding: dict[str, Any],
    chunking: dict[str, Any],
    counts: dict[str, Any],
    chunks: Iterable[Chunk] | None = None,
    docstore: Path | None = None,
    vectors: np.ndarray | None = None,
    index_extra: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every file of an index folder into ``folder`` (which must exist) and return
    the manifest written.

    The docstore comes from ``chunks`` (ids 0..n-1 in order) or, with ``docstore``, is
    hard-linked from a folder that already holds one (the scale benchmark shares one
    docstore between index types). ``vectors`` also writes the float32 embeddings.
    ``index_extra`` is merged into the manifest's ``index`` section, ``extra`` adds
    top-level sections (``skipped``, ``source``, ``corpus``, ``build``).
    """
    if (chunks is None) == (docstore is None):
        raise ValueError("give the chunks or a docstore folder to link, not both or neither")
    folder = Path(folder)
    index.save(folder)
    if chunks is not None:
        written = write_docstore(folder, chunks)
        if written != index.ntotal:
            raise ValueError(f"{written} chunks for {index.ntotal} vectors: the docstore must match the index")
    else:
        for name in (CHUNKS_FILE, OFFSETS_FILE):
            os.link(Path(docstore) / name, folder / name)  # type: ignore[arg-type]
    files = [INDEX_FILE, CHUNKS_FILE, OFFSETS_FILE]
    if vectors is not None:
        np.save(folder / VECTORS_FILE, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
        files.append(VECTORS_FILE)
    body: dict[str, Any] = {
        "ragserve_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "embedding": embedding,
        "chunking": chunking,
        "index": {**index.spec.to_manifest(), "ntotal": index.ntotal, **(index_extra or {})},
        "counts": counts,
        **(extra or {}),
    }
    return write_manifest(folder, body, files)


def publish_index_folder(out: Path, index: FaissIndex, **parts: Any) -> tuple[dict[str, Any], Path]:
    """Write a new version of the index at ``out`` (``parts`` as for ``write_index_folder``)
    and switch ``out`` to it atomically; returns the manifest and the version's real folder.

    The old version stays at ``out`` until the switch, whatever fails before it.
    """
    out = Path(out)
    with build_folder(out) as tmp:
        manifest = write_index_folder(tmp, index, **parts)
        return manifest, publish(out, tmp, manifest["fingerprint"])
