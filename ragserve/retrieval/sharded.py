"""One index over N shards, in process: search every shard, merge the top-k.

``ShardedIndex`` is a ``VectorIndex``: each shard is a mapped ``FaissIndex`` holding the
global chunk ids ``offsets[i] .. offsets[i+1] - 1`` as its own 0..n-1 (``index/shards.py``);
a search asks every shard for its top-k and keeps the k best of the N·k, by score, then
global id. For flat shards this is exactly the unsharded top-k (every vector is scored,
the float16 codes are the same); IVF shards that share one coarse quantizer probe the
same lists for a query as one index would, so the union at one nprobe is one index's
candidates; HNSW shards are approximate each, like one graph.

``ShardedDocStore`` routes each global id to its shard's lazy docstore. The retriever,
engine and cache are unchanged: they see one index and one docstore.

NOTE on the fan-out: the shards are searched on a small thread pool (FAISS releases the
GIL while it searches), so N shards on C cores take about the time of the largest one
per core; a single query searches each shard on one OpenMP thread (``faiss_index``).
Own merge rather than FAISS's ``IndexShards``: the shards are separate mapped files with
separate docstores and query settings, and the merge is a few microseconds.

**Usage:** ``index = ShardedIndex([FaissIndex.load(f, spec) for f in folders]); index.search(q, 10)``
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ragserve.errors import ShardUnavailableError
from ragserve.retrieval.docstore import LazyDocStore
from ragserve.retrieval.faiss_index import FaissIndex, as_queries
from ragserve.types import Chunk, Hit


class ShardedIndex:
    """A read-only ``VectorIndex`` over shards whose ids follow each other."""

    def __init__(self, shards: Sequence[FaissIndex], *, threads: int = 0) -> None:
        """``threads``: search threads (0: one per shard, at most the CPU count)."""
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        dims = {s.dim for s in shards}
        if len(dims) != 1:
            raise ValueError(f"shards of different dimensions {sorted(dims)}")
        self.shards = list(shards)
        self.offsets = np.cumsum([0] + [s.ntotal for s in self.shards]).astype(np.int64)
        self.names = [f"shard {i}" for i in range(len(self.shards))]
        """The shards' names, in order: what ``search_marked`` reports as missing (the
        fan-out over shard actors names them by their folders, ``shard-001``)."""
        workers = threads or min(len(self.shards), os.cpu_count() or 1)
        self._pool = (
            ThreadPoolExecutor(workers, thread_name_prefix="ragserve-shard")
            if (workers > 1 and len(self.shards) > 1)
            else None
        )

    @property
    def ntotal(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return self.shards[0].dim

    @property
    def spec(self) -> Any:
        return self.shards[0].spec

    @property
    def index_type(self) -> str:
        return self.shards[0].index_type

    @property
    def search_params(self) -> dict[str, int]:
        return {**self.shards[0].search_params, "shards": len(self.shards)}

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k hits per query over every shard, best first, with global chunk ids (the
        contract of ``FaissIndex.search``: ``k`` clamped, no padding, non-finite rows empty).
        Whole or ``ShardUnavailableError``: a partial search is read with ``search_marked``."""
        rows, missing = self.search_marked(queries, k)
        if missing:
            raise ShardUnavailableError(getattr(self, "path", ""), list(missing),
                                        "a partial search is read with search_marked")
        return rows

    def search_marked(self, queries: np.ndarray, k: int) -> tuple[list[list[Hit]], tuple[str, ...]]:
        """``search``, and the names of the shards that did not answer (only a fan-out that
        allows partial answers returns any: ``fanout.RemoteShardedIndex``); their rows are
        the other shards' merged top-k."""
        x = as_queries(queries, self.dim)
        per_shard, gone = self._fan_out(x, k, fill=False)
        rows = [merge_top_k([r[q] for r in per_shard], self.offsets, k) for q in range(len(x))]
        # NOTE: a shard's approximate search may come back short of k (its probed lists are
        # small); only when the merged row is short too are the shards searched again
        # exhaustively, as one index does: at one nprobe the merged candidates are then
        # one index's, not more. Shards that did not answer hold no candidates.
        want = min(k, self._present(gone))
        short = [q for q, row in enumerate(rows) if len(row) < want and np.isfinite(x[q]).all()]
        if short:
            again, also = self._fan_out(x[short], k, fill=True)
            gone = gone | also
            for j, q in enumerate(short):
                rows[q] = merge_top_k([r[j] for r in again], self.offsets, k)
        return rows, tuple(self.names[i] for i in sorted(gone))

    def _present(self, gone: set[int]) -> int:
        return self.ntotal - sum(int(self.offsets[i + 1] - self.offsets[i]) for i in gone)

    def _fan_out(self, x: np.ndarray, k: int, *, fill: bool) -> tuple[list[list[list[Hit]]], set[int]]:
        """Per shard, per query: that shard's top-k (local ids); and the positions of the
        shards that did not answer (their rows empty). In process every shard answers."""
        if self._pool is None:
            return [s.search(x, k, fill=fill) for s in self.shards], set()
        futures = [self._pool.submit(s.search, x, k, fill=fill) for s in self.shards[1:]]
        return [self.shards[0].search(x, k, fill=fill)] + [f.result() for f in futures], set()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def merge_top_k(per_shard: Sequence[Sequence[Hit]], offsets: np.ndarray, k: int) -> list[Hit]:
    """The k best of each shard's hits (local ids, shard ``i`` starting at ``offsets[i]``),
    as global ids: by score, ties by global id, like one index's ordering of equal scores."""
    merged = [Hit(int(offsets[i]) + h.chunk_id, h.score) for i, hits in enumerate(per_shard) for h in hits]
    merged.sort(key=lambda h: (-h.score, h.chunk_id))
    return merged[:k]


class ShardedDocStore:
    """A ``DocStore`` over the shards' lazy docstores; global ids in, chunks with global
    ids out."""

    def __init__(self, stores: Sequence[LazyDocStore]) -> None:
        self.stores = list(stores)
        self.offsets = np.cumsum([0] + [len(s) for s in self.stores]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def shard_of(self, chunk_id: int) -> int:
        if not 0 <= chunk_id < len(self):
            raise KeyError(f"chunk id {chunk_id} is not in the docstore (size {len(self)})")
        return int(np.searchsorted(self.offsets, chunk_id, side="right")) - 1

    def get(self, chunk_id: int) -> Chunk:
        shard = self.shard_of(chunk_id)
        c = self.stores[shard].get(chunk_id - int(self.offsets[shard]))
        return Chunk(chunk_id=chunk_id, doc_id=c.doc_id, text=c.text, metadata=c.metadata)

    def get_many(self, ids: Sequence[int]) -> list[Chunk]:
        return [self.get(i) for i in ids]

    def close(self) -> None:
        for s in self.stores:
            s.close()
