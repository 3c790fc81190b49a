"""The one way an index folder is written: full builds, incremental builds, ``ragserve
eval`` and ``benchmarks/bench_scale.py`` all call ``publish_index_folder`` (which writes the
folder with ``write_index_folder`` and publishes it as the new version, ``versions.py``).

A folder holds ``index.faiss``, the docstore (``chunks.jsonl`` + ``chunks.offsets.npy``),
optionally the float32 vectors (``vectors.f32.npy``), and ``manifest.json`` written last
with the SHA-256 of every file. The caller gives the parts that differ between builds
(embedding, chunking, counts, and extra sections such as ``corpus`` or ``source``); the
common ones (version, creation time, index section) are filled in here, so every folder
has the same shape whoever wrote it.

A sharded index (``shards.py``) is written by the same functions: each shard folder with
``write_index_folder`` (or linked unchanged from the previous version with
``link_shard``), then the top manifest over them with ``write_shard_set``, all inside one
``build_folder`` and published by one flip (``publish_shard_set``).

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
from ragserve.errors import IndexWriteError
from ragserve.index.manifest import MANIFEST_FILE, write_manifest
from ragserve.index.shards import LAYOUT
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
            with IndexWriteError.during("link", folder / name):
                os.link(Path(docstore) / name, folder / name)  # type: ignore[arg-type]
    files = [INDEX_FILE, CHUNKS_FILE, OFFSETS_FILE]
    if vectors is not None:
        with IndexWriteError.during("write", folder / VECTORS_FILE):
            np.save(folder / VECTORS_FILE, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
        files.append(VECTORS_FILE)
    body: dict[str, Any] = {
        **_common(),
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

    The old version stays at ``out`` until the switch, whatever fails before it. A file
    that cannot be written, synced, linked or renamed (a full disk, an I/O error) raises
    ``IndexWriteError`` naming the step and the file; the unfinished folder is removed.
    """
    out = Path(out)
    with build_folder(out) as tmp:
        manifest = write_index_folder(tmp, index, **parts)
        return manifest, publish(out, tmp, manifest["fingerprint"])


def _common() -> dict[str, Any]:
    return {"ragserve_version": __version__, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def link_shard(previous: Path, folder: Path) -> dict[str, Any]:
    """Put an unchanged shard of the previous version into ``folder`` (which must not
    exist) by hard-linking its files (a copy where links are not possible): same files,
    same manifest, same fingerprint, no bytes rewritten. Returns its manifest."""
    import orjson

    with IndexWriteError.during("write", folder):
        folder.mkdir()
    for src in Path(previous).iterdir():
        if src.is_file() and not src.name.startswith("."):
            try:
                os.link(src, folder / src.name)
            except OSError:
                import shutil

                with IndexWriteError.during("write", folder / src.name):
                    shutil.copy2(src, folder / src.name)
    return orjson.loads((folder / MANIFEST_FILE).read_bytes())


def write_shard_set(folder: Path, shards: list[tuple[str, dict[str, Any]]], *, embedding: dict[str, Any],
                    chunking: dict[str, Any], index: dict[str, Any], counts: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the top manifest of a sharded index over the shard folders already in
    ``folder`` (``shards``: each one's name and manifest, in shard order) and return it.

    Each shard's chunk range follows the one before it; ``files`` lists every shard's
    ``manifest.json`` with its hash, so the top fingerprint covers every shard's files.
    """
    entries, first = [], 0
    for name, manifest in shards:
        n = int(manifest["counts"]["chunks"])
        entries.append({"name": name, "fingerprint": manifest["fingerprint"], "first_chunk": first,
                        "chunks": n})
        first += n
    body: dict[str, Any] = {
        **_common(),
        "layout": LAYOUT,
        "embedding": embedding,
        "chunking": chunking,
        "index": {**index, "ntotal": first},
        "counts": {**counts, "chunks": first, "shards": len(entries)},
        "shards": entries,
        **(extra or {}),
    }
    return write_manifest(folder, body, [f"{name}/{MANIFEST_FILE}" for name, _ in shards])


def publish_shard_set(out: Path, write_shards: Any, **parts: Any) -> tuple[dict[str, Any], Path]:
    """Write a new version of the sharded index at ``out`` and flip ``out`` to it:
    ``write_shards(folder)`` writes the shard folders into the new version and returns
    ``[(name, manifest), ...]``; ``parts`` are ``write_shard_set``'s keyword arguments."""
    out = Path(out)
    with build_folder(out) as tmp:
        manifest = write_shard_set(tmp, write_shards(tmp), **parts)
        return manifest, publish(out, tmp, manifest["fingerprint"])
