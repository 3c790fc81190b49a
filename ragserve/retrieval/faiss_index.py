"""FAISS vector index: build, save, load (memory-mapped), search.

Vectors are unit length, so inner product is cosine similarity. The index types and their
parameters are planned in ``index_spec.py``; every type but the ``flat-fp32`` reference
stores float16 codes (2·d bytes per vector), which on this data ranks like exact float32.

NOTE: a loaded index is read-only. Flat, SQ and HNSW storage is mapped from disk with
``IO_FLAG_MMAP_IFC``; IVF lists are mapped with ``IO_FLAG_MMAP`` (FAISS reads them through
read-only ``OnDiskInvertedLists`` over the same file). Adding to a mapped index aborted the
process in a test, so this class has no ``add``: to change an index, build a new version
folder (``index/versions.py`` flips the index path to it atomically; an incremental build reads
the old vectors back with ``vectors()``). A process that still maps the old files keeps a
valid view: an old version is unlinked, never overwritten.

**Usage:**

    index = FaissIndex.build(vectors, plan_index(len(vectors), IndexConfig()))
    index.save(folder)
    index = FaissIndex.load(folder, spec, nprobe=64)      # mapped, read-only
    hits = index.search(query_vectors, k=10)              # list of Hit per query
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ragserve.errors import IndexWriteError
from ragserve.retrieval.index_spec import IVF_KMEANS_ITERATIONS, IndexSpec
from ragserve.types import Hit

INDEX_FILE = "index.faiss"
_IO_FLAG_MMAP_IFC = 1 << 9  # faiss.IO_FLAG_MMAP_IFC; spelled out for faiss builds without it
_ADD_STEPS = 20  # progress updates while adding vectors
_SEED = 1234

ProgressFn = Callable[[str, int, int], None]


def _faiss() -> Any:
    import faiss  # heavy: imported only where an index is built or loaded

    return faiss


def as_queries(vectors: np.ndarray, dim: int) -> np.ndarray:
    """float32, C-contiguous, shape (n, dim): the only layout FAISS accepts."""
    arr = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {arr.shape}")
    return arr


def _spec(spec: IndexSpec | str) -> IndexSpec:
    if isinstance(spec, IndexSpec):
        return spec
    if spec in ("ivf-fp16", "hnsw-fp16"):
        raise ValueError(f"{spec} needs its parameters: pass plan_index(n, config) instead of the name")
    return IndexSpec(spec)


class FaissIndex:
    """A read-only FAISS index over chunk ids 0..ntotal-1, inner-product metric.

    ``nprobe`` (IVF) and ``ef_search`` (HNSW) are query-time settings, passed to FAISS as
    per-call ``SearchParameters`` so that the shared index object itself is never mutated.
    """

    def __init__(self, index: Any, spec: IndexSpec | str, *, nprobe: int = 0, ef_search: int = 0) -> None:
        self._index = index
        self.spec = _spec(spec)
        self.nprobe = min(nprobe or self.spec.nprobe, self.spec.nlist) if self.spec.nlist else 0
        self.ef_search = ef_search or self.spec.ef_search

    @property
    def index_type(self) -> str:
        return self.spec.index_type

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def search_params(self) -> dict[str, int]:
        """The query-time settings in effect (what ``ragserve eval`` reports)."""
        if self.index_type == "ivf-fp16":
            return {"nprobe": self.nprobe}
        if self.index_type == "hnsw-fp16":
            return {"ef_search": self.ef_search}
        return {}

    @classmethod
    def build(cls, vectors: np.ndarray, spec: IndexSpec | str = "flat-fp16", *,
              progress: ProgressFn | None = None, centroids: np.ndarray | None = None) -> FaissIndex:
        """Train (IVF: k-means on a sample) and add ``vectors`` in id order.

        ``progress(phase, done, total)`` is called with phases ``train`` and ``add``.
        ``centroids`` (IVF only) reuses a coarse quantizer instead of training one: an
        incremental build whose corpus has not drifted keeps the previous centroids.
        """
        faiss = _faiss()
        spec = _spec(spec)
        x = as_queries(vectors, vectors.shape[1])
        if len(x) == 0:
            raise ValueError("cannot build an index over zero vectors")
        index = faiss.index_factory(x.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
        if spec.index_type == "hnsw-fp16":
            index.hnsw.efConstruction = spec.ef_construction
        if spec.index_type == "ivf-fp16":
            _train_ivf(faiss, index, x, spec, progress, centroids)
        elif centroids is not None:
            raise ValueError(f"centroids are for ivf-fp16, not {spec.index_type}")
        elif not index.is_trained:
            index.train(x)  # SQfp16 and Flat need no training; kept for future types
        # Added in steps only so that progress moves: FAISS assigns ids in call order, so the
        # ids are 0..n-1 as with one call.
        step = max(1, -(-len(x) // _ADD_STEPS))
        for start in range(0, len(x), step):
            index.add(x[start:start + step])
            if progress:
                progress("add", min(start + step, len(x)), len(x))
        return cls(index, spec)

    def vectors(self, start: int, count: int) -> np.ndarray:
        """Stored vectors ``start .. start+count-1`` decoded to float32 (shape (count, dim)).

        float16 codes decode exactly and encode back to the same codes, so an index built
        from these rows stores what the original embeddings gave (IVF stores residuals to
        the centroid: exact again when the centroids are reused).
        """
        if count <= 0:
            return np.zeros((0, self.dim), np.float32)
        if not 0 <= start <= start + count <= self.ntotal:
            raise ValueError(f"rows {start}..{start + count - 1} are outside 0..{self.ntotal - 1}")
        return np.ascontiguousarray(self._index.reconstruct_n(start, count), dtype=np.float32)

    def sample(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``count`` stored vectors spread evenly over the index, with their chunk
        ids: ``(ids, vectors)``, float32. Reads only those vectors, whatever the index size.

        NOTE: an IVF index cannot look an id up without a direct map (building one reads
        every id), so its sample is taken by position in the inverted lists, each vector
        decoded in place (``reconstruct_from_offset``: residual plus centroid) and its id
        read from the list.
        """
        n, count = self.ntotal, min(count, self.ntotal)
        if count <= 0:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        if self.index_type != "ivf-fp16":
            ids = np.unique(np.linspace(0, n - 1, count).astype(np.int64))
            return ids, np.ascontiguousarray(self._index.reconstruct_batch(ids), dtype=np.float32)
        faiss = _faiss()
        ivf = faiss.extract_index_ivf(self._index)
        lists = ivf.invlists
        sizes = np.array([lists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        ends = np.cumsum(sizes)
        positions = np.unique(np.linspace(0, ends[-1] - 1, count).astype(np.int64))
        list_nos = np.searchsorted(ends, positions, side="right")
        ids = np.empty(len(positions), np.int64)
        out = np.empty((len(positions), self.dim), np.float32)
        for row, (list_no, pos) in enumerate(zip(list_nos, positions)):
            offset = int(pos - (ends[list_no] - sizes[list_no]))
            ivf.reconstruct_from_offset(int(list_no), offset, faiss.swig_ptr(out[row]))
            ids[row] = lists.get_single_id(int(list_no), offset)
        return ids, out

    def centroids(self) -> np.ndarray | None:
        """The IVF coarse quantizer's centroids (nlist, dim); None for other types."""
        if self.index_type != "ivf-fp16":
            return None
        faiss = _faiss()
        quantizer = faiss.extract_index_ivf(self._index).quantizer
        return np.ascontiguousarray(quantizer.reconstruct_n(0, quantizer.ntotal), dtype=np.float32)

    def save(self, folder: Path) -> Path:
        """Write ``folder/index.faiss``; a failed write raises ``IndexWriteError``.

        The bytes go through a Python file: FAISS's own file writer reports a failed
        ``fclose`` only on stderr, so the last buffered bytes could be lost on a full disk
        and the call still return (a truncated index.faiss the manifest would then hash)."""
        faiss = _faiss()
        path = Path(folder) / INDEX_FILE
        with IndexWriteError.during("write", path), open(path, "wb") as f:
            faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write))
        return path

    @classmethod
    def load(cls, folder: Path, spec: IndexSpec | str, *, mmap: bool = True,
             nprobe: int = 0, ef_search: int = 0) -> FaissIndex:
        """Open ``folder/index.faiss`` mapped read-only (``mmap=False`` reads it into memory).

        ``nprobe`` / ``ef_search`` of 0 use the defaults recorded in ``spec`` (the manifest).
        """
        faiss = _faiss()
        spec = _spec(spec)
        path = str(Path(folder) / INDEX_FILE)
        flags = 0
        if mmap:
            flags = faiss.IO_FLAG_MMAP if spec.index_type == "ivf-fp16" else getattr(
                faiss, "IO_FLAG_MMAP_IFC", _IO_FLAG_MMAP_IFC)
        index = faiss.read_index(path, flags)
        if mmap and spec.index_type == "ivf-fp16":
            lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
            # NOTE: OnDiskInvertedLists starts 32 prefetch threads per search, meant for slow
            # disks; on a mapped file in the page cache they cost ~2 ms per query here
            # (1.4 ms instead of 0.14 ms at nprobe 32, 100k vectors).
            if hasattr(lists, "prefetch_nthread"):
                lists.prefetch_nthread = 0
        return cls(index, spec, nprobe=nprobe, ef_search=ef_search)

    def search(self, queries: np.ndarray, k: int, *, fill: bool = True) -> list[list[Hit]]:
        """Top-k hits per query, best first.

        ``k`` above ``ntotal`` is clamped. A query with a NaN or infinite component gets no
        hits (it has no meaningful neighbours); FAISS's ``-1`` padding and non-finite scores
        are dropped, so every hit names a real chunk with a finite score. A row of an
        approximate index that came back short of ``k`` (IVF: the probed lists held fewer
        vectors; HNSW: the walk reached fewer nodes) is searched again exhaustively, so
        ``k >= ntotal`` returns the whole corpus on every index type. ``fill=False`` skips
        that second search (a shard's short row is filled by the other shards' hits).
        """
        x = as_queries(queries, self.dim)
        k = min(k, self.ntotal)
        rows: list[list[Hit]] = [[] for _ in range(len(x))]
        finite = np.flatnonzero(np.isfinite(x).all(axis=1))
        if k <= 0 or len(finite) == 0:
            return rows
        with _one_thread_if(len(finite) == 1):
            scores, ids = self._search(x[finite], k, self._params())
            short = np.flatnonzero((ids < 0).any(axis=1))
            if fill and len(short) and self.index_type in ("ivf-fp16", "hnsw-fp16"):
                scores[short], ids[short] = self._exhaustive(x[finite][short], k)
        for row, row_ids, row_scores in zip(finite, ids, scores):
            rows[row] = [Hit(int(i), float(s)) for i, s in zip(row_ids, row_scores)
                         if 0 <= i < self.ntotal and np.isfinite(s)]
        return rows

    def _search(self, x: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        if params is None:
            return self._index.search(x, k)
        return self._index.search(x, k, params=params)

    def _exhaustive(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if self.index_type == "hnsw-fp16":  # the graph's float16 codes, scanned in full
            return faiss.downcast_index(self._index.storage).search(x, k)
        return self._index.search(x, k, params=faiss.SearchParametersIVF(nprobe=self.spec.nlist))

    def _params(self) -> Any:
        faiss = _faiss()
        if self.index_type == "ivf-fp16":
            return faiss.SearchParametersIVF(nprobe=self.nprobe)
        if self.index_type == "hnsw-fp16":
            return faiss.SearchParametersHNSW(efSearch=self.ef_search)
        return None


@contextmanager
def _one_thread_if(single: bool) -> Iterator[None]:
    """FAISS with one OpenMP thread in the calling thread while ``single`` holds.

    NOTE: FAISS parallelises search over queries, so one query gains nothing from a second
    thread, but exhaustive SQfp16 still starts a full OpenMP team and waits at its barrier.
    On this 2-core machine under load a single SQfp16 query over 100k vectors took 24 ms
    with 2 threads and 4.5 ms with 1. The setting is per thread (an OpenMP ICV), so
    concurrent callers and batched searches elsewhere keep every thread.
    """
    if not single:
        yield
        return
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def ivf_sample_rows(n: int, train_size: int) -> np.ndarray:
    """The rows of ``n`` vectors (in chunk order) that IVF k-means trains on: all of them,
    or a seeded sample of ``train_size``, ascending. A sharded build samples the same rows
    of its whole corpus, so it trains the centroids one index would."""
    if train_size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(_SEED).choice(n, train_size, replace=False))


def _train_ivf(faiss: Any, index: Any, x: np.ndarray, spec: IndexSpec, progress: ProgressFn | None,
               centroids: np.ndarray | None = None) -> None:
    """k-means for the coarse quantizer on a seeded sample, one iteration per call so that
    progress can be reported (FAISS's own ``train`` runs all iterations in C++ silently).

    Each call continues from the previous centroids, which is what the iterations inside
    one FAISS call do; ``spherical`` matches what ``index_factory`` sets for inner product.
    Given ``centroids``, k-means is skipped and those become the quantizer.
    """
    ivf = faiss.extract_index_ivf(index)
    sample = x[ivf_sample_rows(len(x), spec.train_size)]
    if centroids is not None:
        if centroids.shape != (spec.nlist, x.shape[1]):
            raise ValueError(f"centroids of shape {centroids.shape} for nlist {spec.nlist}, dim {x.shape[1]}")
        ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        ivf.train(sample)
        return
    for it in range(IVF_KMEANS_ITERATIONS):
        clus = faiss.Clustering(x.shape[1], spec.nlist)
        clus.niter = 1
        clus.seed = _SEED
        clus.spherical = True
        clus.max_points_per_centroid = len(sample)  # the sample is already drawn: use all of it
        clus.min_points_per_centroid = 1  # plan_index keeps >= 39 points per list
        if centroids is not None:
            faiss.copy_array_to_vector(centroids.ravel(), clus.centroids)
        clus.train(sample, faiss.IndexFlatIP(x.shape[1]))
        centroids = faiss.vector_to_array(clus.centroids).reshape(spec.nlist, x.shape[1])
        if progress:
            progress("train", it + 1, IVF_KMEANS_ITERATIONS)
    ivf.quantizer.add(centroids)
    # The quantizer now holds nlist centroids, so FAISS's train skips k-means and only
    # trains the float16 encoder (a no-op for fp16, kept so any encoder is trained).
    ivf.train(sample)


FIT_SAMPLE = 4096
"""Vectors sampled (seeded) to measure how well IVF centroids fit a corpus."""


def quantizer_fit(centroids: np.ndarray, vectors: np.ndarray, sample: int = FIT_SAMPLE) -> float:
    """Mean cosine between a seeded sample of ``vectors`` and their nearest centroid.

    Recorded when IVF centroids are trained; an incremental build measures it again on
    the new corpus, and a drop means the corpus has drifted away from the centroids
    (lists grow unevenly and nprobe finds fewer true neighbours).
    """
    faiss = _faiss()
    rng = np.random.default_rng(_SEED)
    rows = np.arange(len(vectors)) if sample >= len(vectors) else np.sort(rng.choice(len(vectors), sample, replace=False))
    c = as_queries(centroids, centroids.shape[1])
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    flat = faiss.IndexFlatIP(c.shape[1])
    flat.add(c)
    scores, _ = flat.search(as_queries(vectors[rows], c.shape[1]), 1)
    return round(float(scores.mean()), 4)
