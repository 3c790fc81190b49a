"""The served index as a snapshot: what a request reads, captured once when it starts.

A ``ServedIndex`` is one verified version of an index folder (or of a sharded index: every
shard of one version, searched as one index, ``retrieval/sharded.py``): its manifest, the mapped
FAISS index, the lazy docstore and the retriever over them, and the fingerprint that goes
into every cache key. ``Snapshots`` holds the current one. A request takes the current
snapshot when it is prepared and keeps it to the end, so its chunk ids resolve against the
docstore it searched and its cache key carries the fingerprint of the index it used.
``swap`` (a reload) replaces one reference: requests already running finish on the old
snapshot, new ones get the new one, and the old one's files are released when the last
request using it ends.

**Usage:** ``snap = snapshots.acquire(); try: ... snap.retriever ... finally: snapshots.release(snap)``
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragserve.config import RAGConfig
from ragserve.index.contents import load_checked
from ragserve.index.manifest import Manifest, check_embedding
from ragserve.index.shards import ShardEntry, check_quantizer, shard_entries
from ragserve.index.verify import check_index
from ragserve.retrieval.retriever import Retriever
from ragserve.types import DocStore, Embedder, VectorIndex

ShardOpener = Callable[[Manifest, list[Manifest], dict[str, int]], VectorIndex]
"""Opens the vectors of a verified sharded index somewhere else than this process: called
with the top manifest, each shard's manifest and the query settings, returns the
``VectorIndex`` that searches them (``ray/serve/fanout.py``: the shard actors of ``serve
--ray``). The docstores stay here, read lazily from the same folders."""


@dataclass(eq=False)
class ServedIndex:
    manifest: Manifest
    index: VectorIndex
    docstore: DocStore
    retriever: Retriever
    users: int = 0
    """Requests holding this snapshot right now."""
    retired: bool = False
    """Replaced by a newer one: closed once ``users`` reaches 0."""
    closed: bool = False

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.retriever.close()
            close = getattr(self.index, "close", None)  # a sharded index's search threads
            if close:
                close()


def open_served(path: str | Path, config: RAGConfig, embedder: Embedder,
                executor: Executor | None = None, shards: ShardOpener | None = None) -> ServedIndex:
    """``open_index`` and a retriever over it (on ``executor``, shared by every version)."""
    manifest, index, docstore = open_index(path, config, embedder, shards)
    return ServedIndex(manifest, index, docstore, Retriever(embedder, index, docstore, config.embed, executor))


def open_index(path: str | Path, config: RAGConfig, embedder: Embedder,
               shards: ShardOpener | None = None) -> tuple[Manifest, VectorIndex, DocStore]:
    """Verify an index folder (hashes, structure, contents), check it was built with this
    embedding model, map its files and check a sample of its vectors. ``shards``: where a
    sharded index's vectors are searched (default: mapped here, ``ShardedIndex``). Raises
    ``IndexNotFoundError``, ``IndexIntegrityError`` or ``IndexMismatchError`` before
    anything is served from it. A symlinked (versioned) index is resolved once: a later
    flip changes nothing here."""
    from ragserve.retrieval.docstore import LazyDocStore

    checked = check_index(path, vectors="none")  # the sample is read from the index mapped below
    manifest = checked.manifest
    check_embedding(manifest, embedder.identity, int(manifest.embedding["dim"]))
    load = {"nprobe": config.index.ivf_nprobe, "ef_search": config.index.hnsw_ef_search}
    if checked.shards:
        index, docstore = _open_shards(manifest, [s.manifest for s in checked.shards], load, shards)
    else:
        index, docstore = load_checked(manifest, **load)[0], LazyDocStore(manifest.folder)
    embedder.warm_up()
    check_embedding(manifest, embedder.identity, embedder.dim)
    return manifest, index, docstore


def _open_shards(top: Manifest, shards: list[Manifest], load: dict[str, int],
                 opener: ShardOpener | None = None) -> tuple[VectorIndex, DocStore]:
    """Map every shard of a verified sharded index (``open_shard``) as one index, or hand
    them to ``opener``, and open their docstores as one. All shards come from the one
    version folder ``top`` was read from, so a reload flips them together."""
    from ragserve.retrieval.docstore import LazyDocStore
    from ragserve.retrieval.sharded import ShardedDocStore, ShardedIndex

    entries = shard_entries(top)
    if len(entries) != len(shards):
        raise ValueError(f"{len(shards)} shard manifests for {len(entries)} shards")
    stores: list[LazyDocStore] = []
    try:
        if opener is not None:
            index: VectorIndex = opener(top, shards, load)
        else:
            index = ShardedIndex([open_shard(top, entry, shard, load)
                                  for entry, shard in zip(entries, shards, strict=True)])
        for shard in shards:
            stores.append(LazyDocStore(shard.folder))
    except BaseException:
        for store in stores:
            store.close()
        raise
    return index, ShardedDocStore(stores)


def open_shard(top: Manifest, entry: ShardEntry, shard: Manifest, load: dict[str, int]) -> Any:
    """Map one verified shard (a ``FaissIndex``), check a sample of its vectors and the IVF
    quantizer it really holds; in this process, or in a shard actor."""
    index = load_checked(shard, **load)[0]
    check_quantizer(top, entry, index.centroids())
    return index


class Snapshots:
    """The current ``ServedIndex`` and the counts of who holds which (thread-safe)."""

    def __init__(self, first: ServedIndex) -> None:
        self.current = first
        self._lock = threading.Lock()

    def acquire(self) -> ServedIndex:
        with self._lock:
            snap = self.current
            snap.users += 1
            return snap

    @asynccontextmanager
    async def holding(self, snap: ServedIndex) -> AsyncIterator[None]:
        """Hold ``snap`` (already held by the caller, so still open) for a block, e.g. a
        shared run whose followers may outlive the request that started it."""
        with self._lock:
            assert not snap.closed, "hold a snapshot only while someone holds it already"
            snap.users += 1
        try:
            yield
        finally:
            self.release(snap)

    def release(self, snap: ServedIndex) -> None:
        with self._lock:
            snap.users -= 1
            done = snap.retired and snap.users == 0
        if done:
            snap.close()

    def swap(self, new: ServedIndex) -> ServedIndex:
        """Make ``new`` current; returns the old one (closed now if nobody holds it)."""
        with self._lock:
            old, self.current = self.current, new
            old.retired = True
            done = old.users == 0
        if done:
            old.close()
        return old

    def close(self) -> None:
        with self._lock:
            snap = self.current
            snap.retired = True
        snap.close()


def describe(snap: ServedIndex) -> dict[str, Any]:
    m = snap.manifest
    out = {"fingerprint": m.fingerprint, "folder": str(m.folder), "chunks": m.data["counts"]["chunks"],
           "index_type": m.data["index"]["type"]}
    if "shards" in m.data:
        out["shards"] = len(m.data["shards"])
    return out
