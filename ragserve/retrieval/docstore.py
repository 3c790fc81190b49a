"""Lazy chunk store on disk.

Layout in the index folder:

- ``chunks.jsonl``: one JSON object per chunk (``doc_id``, ``text``, ``metadata``), in
  chunk-id order;
- ``chunks.offsets.npy``: ``uint64[n + 1]``, the byte offset where each line starts
  (the last entry is the file size).

Opening maps both files, so it costs O(1) memory whatever the corpus size; ``get_many``
reads only the requested lines. JSON, never pickle: the store is safe to load from an
untrusted folder (the manifest's hashes are checked before it is opened).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import orjson

from ragserve.errors import IndexIntegrityError, IndexWriteError
from ragserve.types import Chunk

CHUNKS_FILE = "chunks.jsonl"
OFFSETS_FILE = "chunks.offsets.npy"


def write_docstore(folder: Path, chunks: Iterable[Chunk]) -> int:
    """Write chunks (ids must be 0..n-1 in order); returns how many were written.

    Both files are written under temporary names and renamed into place only when both
    are complete, the offsets last: a failure while writing (a chunk that cannot be
    encoded, a full disk, an interrupt) leaves a store already in the folder as it was,
    and a crash between the two renames leaves new lines with old offsets, which opening
    refuses (the offsets end at the old size). Never a store that reads wrong lines.
    A file that cannot be written or renamed raises ``IndexWriteError`` naming the step and
    the file (an error of ``chunks`` itself is raised as it is).
    """
    folder = Path(folder)
    tmp_chunks = folder / f".{CHUNKS_FILE}.tmp-{os.getpid()}"
    tmp_offsets = folder / f".{OFFSETS_FILE}.tmp-{os.getpid()}.npy"
    lines, offsets = folder / CHUNKS_FILE, folder / OFFSETS_FILE
    try:
        ends = [0]
        with IndexWriteError.during("write", lines):
            f = open(tmp_chunks, "wb")
        with f:
            for expected, chunk in enumerate(chunks):
                if chunk.chunk_id != expected:
                    raise ValueError(f"chunk ids must be consecutive: expected {expected}, got {chunk.chunk_id}")
                line = orjson.dumps({"doc_id": chunk.doc_id, "text": chunk.text, "metadata": chunk.metadata})
                try:
                    f.write(line + b"\n")
                except OSError as e:
                    raise IndexWriteError(lines, "write", e.strerror or str(e), e.errno) from e
                ends.append(ends[-1] + len(line) + 1)
            with IndexWriteError.during("write", lines):
                f.close()  # the last buffered lines: a full disk can show only here
        with IndexWriteError.during("write", offsets):
            np.save(tmp_offsets, np.asarray(ends, dtype=np.uint64), allow_pickle=False)
        with IndexWriteError.during("rename", lines):
            os.replace(tmp_chunks, lines)
        with IndexWriteError.during("rename", offsets):
            os.replace(tmp_offsets, offsets)
    finally:
        tmp_chunks.unlink(missing_ok=True)
        tmp_offsets.unlink(missing_ok=True)
    return len(ends) - 1


class LazyDocStore:
    """Read-only, memory-mapped view of a docstore folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        path = self.folder / CHUNKS_FILE
        for name in (CHUNKS_FILE, OFFSETS_FILE):
            if not (self.folder / name).is_file():
                raise IndexIntegrityError(self.folder / name, "missing: the docstore is incomplete")
        try:
            self._offsets = np.load(self.folder / OFFSETS_FILE, mmap_mode="r", allow_pickle=False)
        except ValueError as e:  # not an .npy file, or an object array that would need pickle
            raise IndexIntegrityError(self.folder / OFFSETS_FILE, f"not a plain .npy array: {e}") from None
        self._file = open(path, "rb")
        size = path.stat().st_size
        if len(self._offsets) < 1 or int(self._offsets[-1]) != size:
            self._file.close()
            raise IndexIntegrityError(path, "chunk offsets do not match the file size")
        # NOTE: an empty file cannot be mapped; a docstore with no chunks never reaches here
        # because build-index refuses an empty corpus.
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def get(self, chunk_id: int) -> Chunk:
        if not 0 <= chunk_id < len(self):
            raise KeyError(f"chunk id {chunk_id} is not in the docstore (size {len(self)})")
        if self._map is None:  # a closed version: a request must hold its snapshot (served.py)
            raise IndexIntegrityError(self.folder, "the docstore was closed while a request still read it")
        start, end = int(self._offsets[chunk_id]), int(self._offsets[chunk_id + 1])
        try:
            row = orjson.loads(self._map[start:end])
        except orjson.JSONDecodeError as e:
            raise IndexIntegrityError(self.folder / CHUNKS_FILE, f"chunk {chunk_id} is not valid JSON: {e}") from e
        return Chunk(chunk_id=chunk_id, doc_id=row["doc_id"], text=row["text"], metadata=row["metadata"])

    def get_many(self, ids: Sequence[int]) -> list[Chunk]:
        return [self.get(i) for i in ids]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()
