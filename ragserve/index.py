"""FAISS vector index: build, save, load (memory-mapped), search.

Vectors are unit length, so inner product is cosine similarity. The default index stores
them as float16 codes (``IndexScalarQuantizer`` QT_fp16: 2·d bytes per vector), which on
this data ranks like exact float32 search at half the memory.

NOTE: a loaded index is read-only. It is mapped from disk with ``IO_FLAG_MMAP_IFC`` (the
flag that maps Flat/SQ storage; ``IO_FLAG_MMAP`` alone maps only IVF lists), and adding
to a mapped index aborted the process in a test. To change an index, build a new folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ragserve.types import Hit

INDEX_FILE = "index.faiss"
_IO_FLAG_MMAP_IFC = 1 << 9  # faiss.IO_FLAG_MMAP_IFC; spelled out for faiss builds without it

INDEX_TYPES: dict[str, dict[str, Any]] = {
    "flat-fp16": {"faiss": "SQfp16", "bytes_per_dim": 2},
    "flat-fp32": {"faiss": "Flat", "bytes_per_dim": 4},
}


def _faiss() -> Any:
    import faiss  # heavy: imported only where an index is built or loaded

    return faiss


def as_queries(vectors: np.ndarray, dim: int) -> np.ndarray:
    """float32, C-contiguous, shape (n, dim): the only layout FAISS accepts."""
    arr = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {arr.shape}")
    return arr


class FaissIndex:
    """A FAISS index over chunk ids 0..ntotal-1, inner-product metric."""

    def __init__(self, index: Any, index_type: str) -> None:
        self._index = index
        self.index_type = index_type

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @classmethod
    def build(cls, vectors: np.ndarray, index_type: str = "flat-fp16") -> FaissIndex:
        faiss = _faiss()
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {sorted(INDEX_TYPES)}, got {index_type!r}")
        x = as_queries(vectors, vectors.shape[1])
        index = faiss.index_factory(x.shape[1], INDEX_TYPES[index_type]["faiss"], faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(x)
        index.add(x)
        return cls(index, index_type)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / INDEX_FILE
        _faiss().write_index(self._index, str(path))
        return path

    @classmethod
    def load(cls, folder: Path, index_type: str, *, mmap: bool = True) -> FaissIndex:
        faiss = _faiss()
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", _IO_FLAG_MMAP_IFC) if mmap else 0
        index = faiss.read_index(str(Path(folder) / INDEX_FILE), flags)
        return cls(index, index_type)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k hits per query, best first.

        ``k`` above ``ntotal`` is clamped; FAISS's ``-1`` padding and non-finite scores
        (a NaN query) are dropped, so every hit names a real chunk with a finite score.
        """
        x = as_queries(queries, self.dim)
        k = min(k, self.ntotal)
        if k <= 0 or len(x) == 0:
            return [[] for _ in range(len(x))]
        scores, ids = self._index.search(x, k)
        return [
            [Hit(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0 and np.isfinite(s)]
            for row_ids, row_scores in zip(ids, scores)
        ]
