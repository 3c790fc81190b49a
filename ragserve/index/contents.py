"""What an index folder's files hold must agree with its manifest: chunk ranges, docstore
records, vectors. ``structure.py`` checks the files' shapes (headers, counts, offsets);
this module checks their contents, which a manifest re-hashed over them cannot vouch for
(a buggy writer or a hand-made copy leaves exactly that):

- ``corpus`` (incremental builds read it): the chunk ranges of the source files cover
  chunk ids 0..n-1 exactly once, none past the end of the docstore. Two files claiming
  the same chunks made the next incremental build drop one file's text; a range past
  the end made it crash on a bare ``KeyError``.
- the docstore: every record in a file's range belongs to that file (its ``doc_id``), and
  no record appears twice (one chunk served twice). Vectorised over the mapped file: it
  costs about as much as hashing it again.
- the vectors are finite, not all zero, and of unit norm when ``embedding.normalized``
  says so. All-zero vectors served every score as 0.000, NaN vectors no sources at all.
  Opening checks a sample (``SAMPLE`` vectors spread over the index, read in place
  whatever its type and size); ``verify-index`` checks every vector.

Every refusal is an ``IndexIntegrityError`` naming the file and the inconsistency.

**Usage:** ``ranges = check_corpus(manifest, chunks); check_records(folder, ranges)``;
``check_vectors(manifest, FaissIndex.load(...), every=True)``
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from ragserve.errors import IndexIntegrityError
from ragserve.retrieval.docstore import CHUNKS_FILE, OFFSETS_FILE
from ragserve.retrieval.faiss_index import INDEX_FILE, FaissIndex
from ragserve.retrieval.index_spec import IndexSpec

if TYPE_CHECKING:
    from ragserve.index.manifest import Manifest

SAMPLE = 256
"""Vectors read at open (spread over the index): ~1 ms for any index type and size."""
NORM_TOLERANCE = 0.01
"""float16 codes of unit vectors have norms within ~1e-3 of 1."""
_BLOCK = 1 << 15  # rows per step when every vector or record is read (bounded memory)


@dataclass(frozen=True)
class Range:
    """Chunks ``start .. end - 1`` belong to the source file ``doc_id``."""

    start: int
    end: int
    doc_id: str

    def __str__(self) -> str:
        return f"{self.start}–{self.end - 1}"


def check_corpus(manifest: Manifest, chunks: int) -> list[Range]:
    """The per-file chunk ranges of the manifest's ``corpus`` tile 0..chunks-1 exactly
    once; returns them in chunk order (empty when the manifest records no corpus)."""
    corpus = manifest.data.get("corpus")
    if corpus is None:
        return []
    path = manifest.folder / "manifest.json"
    files = corpus.get("files") if isinstance(corpus, dict) else None
    if not isinstance(files, dict):
        raise IndexIntegrityError(path, "corpus.files must be an object of per-file records")
    ranges = []
    for doc_id, record in files.items():
        first, count = (record.get("first_chunk"), record.get("chunks")) if isinstance(record, dict) else (None, None)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (first, count)):
            raise IndexIntegrityError(path, f"corpus.files[{doc_id!r}] has first_chunk {first!r} and chunks "
                                      f"{count!r}: not a chunk range")
        if count:
            ranges.append(Range(first, first + count, doc_id))
    ranges.sort(key=lambda r: (r.start, r.end, r.doc_id))
    for r in ranges:
        if r.end > chunks:
            raise IndexIntegrityError(path, f"{r.doc_id} claims chunks {r}, past the end of the docstore "
                                      f"({chunks} chunks, 0–{chunks - 1})")
    for before, r in pairwise(ranges):
        if r.start < before.end:
            shared = Range(r.start, min(r.end, before.end), "")
            raise IndexIntegrityError(path, f"chunks {shared} are claimed by both {before.doc_id} and {r.doc_id}")
    covered = 0
    for r in [*ranges, Range(chunks, chunks, "")]:
        if r.start > covered:
            raise IndexIntegrityError(path, f"chunks {Range(covered, r.start, '')} belong to no source file "
                                      "of the corpus")
        covered = r.end
    return ranges


def check_records(folder: Path, ranges: list[Range]) -> None:
    """The docstore's records: each belongs to the file whose range holds it (when the
    manifest records a corpus), and none appears twice."""
    offsets = np.load(folder / OFFSETS_FILE, mmap_mode="r", allow_pickle=False)
    starts = np.asarray(offsets[:-1], dtype=np.int64)
    ends = np.asarray(offsets[1:], dtype=np.int64)
    with open(folder / CHUNKS_FILE, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if len(m) < 8:  # no whole word to compare: a line or two, checked one by one
            for r in ranges:
                for chunk_id in range(r.start, r.end):
                    _check_owner(folder, m, starts, chunk_id, r)
            lines = [m[int(a):int(b)] for a, b in zip(starts, ends)]
            if len(set(lines)) < len(lines):
                raise IndexIntegrityError(folder / CHUNKS_FILE, "two chunks are the same record")
            return
        _check_owners(folder, m, starts, ranges)
        _check_duplicates(folder, m, starts, ends)


def _words(m: mmap.mmap) -> np.ndarray:
    """Every 8-byte window of the map as a uint64 (``words[i]``: bytes i..i+7), without a
    copy: comparing a few words per line costs an eighth of comparing its bytes."""
    return np.ndarray((max(len(m) - 7, 0),), dtype="<u8", buffer=m, strides=(1,))


def _check_owners(folder: Path, m: mmap.mmap, starts: np.ndarray, ranges: list[Range]) -> None:
    """Compare each record's first bytes with ``{"doc_id":"<its file>",`` (how the writer
    starts every line), 8 bytes at a time for every record at once (each file's prefix
    padded and masked to a whole number of words); a record that differs is parsed, so a
    store written with another key order is judged by its doc_id too."""
    if not ranges:
        return
    prefixes = [b'{"doc_id":' + orjson.dumps(r.doc_id) + b"," for r in ranges]
    width = -(-max(len(p) for p in prefixes) // 8) * 8
    expected = np.frombuffer(b"".join(p.ljust(width, b"\0") for p in prefixes), dtype="<u8").reshape(len(ranges), -1)
    masks = np.frombuffer(b"".join((b"\xff" * len(p)).ljust(width, b"\0") for p in prefixes),
                          dtype="<u8").reshape(len(ranges), -1)
    owner = np.repeat(np.arange(len(ranges)), [r.end - r.start for r in ranges])  # ranges tile 0..n-1
    words = _words(m)
    try:
        for block in range(0, len(starts), _BLOCK):
            at, whose = starts[block:block + _BLOCK], owner[block:block + _BLOCK]
            same = np.ones(len(at), dtype=bool)
            for col in range(expected.shape[1]):
                got = words[np.minimum(at + 8 * col, len(words) - 1)]
                same &= (got & masks[whose, col]) == expected[whose, col]
            for chunk_id in np.flatnonzero(~same) + block:
                _check_owner(folder, m, starts, int(chunk_id), ranges[owner[chunk_id]])
    finally:
        del words  # no view into the map may outlive it


def _check_owner(folder: Path, m: mmap.mmap, starts: np.ndarray, chunk_id: int, r: Range) -> None:
    end = int(starts[chunk_id + 1]) if chunk_id + 1 < len(starts) else len(m)
    try:
        record = orjson.loads(m[int(starts[chunk_id]):end])
        doc_id = record["doc_id"]
    except (orjson.JSONDecodeError, TypeError, KeyError) as e:
        raise IndexIntegrityError(folder / CHUNKS_FILE, f"chunk {chunk_id} is not a docstore record "
                                  f"({type(e).__name__}: {e})") from None
    if doc_id != r.doc_id:
        raise IndexIntegrityError(folder / CHUNKS_FILE, f"chunk {chunk_id} is a record of {doc_id!r}, but the "
                                  f"manifest gives chunks {r} to {r.doc_id!r}")


def _check_duplicates(folder: Path, m: mmap.mmap, starts: np.ndarray, ends: np.ndarray) -> None:
    """No two lines are the same bytes. Lines are grouped by a hash of their length and
    two 8-byte words inside them (a third and two thirds in); only lines in one group are
    compared in full (distinct chunks almost never share one)."""
    words = _words(m)
    try:
        lengths = ends - starts
        keys = lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        inside = lengths >= 8  # shorter lines are told apart by their length and full compare
        for third, mix in ((1, 0xBF58476D1CE4E5B9), (2, 0x94D049BB133111EB)):
            at = np.minimum(starts + (lengths * third) // 3, ends - 8)
            word = np.where(inside, words[np.clip(at, 0, len(words) - 1)], np.uint64(0))
            keys = (keys ^ word) * np.uint64(mix)
    finally:
        del words
    order = np.argsort(keys)
    same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    for i in same:
        a, b = sorted((int(order[i]), int(order[i + 1])))
        if m[int(starts[a]):int(ends[a])] == m[int(starts[b]):int(ends[b])]:
            raise IndexIntegrityError(folder / CHUNKS_FILE, f"chunks {a} and {b} are the same record "
                                      f"({_doc_of(m, int(starts[a]), int(ends[a]))}): one chunk would be "
                                      "served twice and another never")


def _doc_of(m: mmap.mmap, start: int, end: int) -> str:
    try:
        return f"doc {orjson.loads(m[start:end])['doc_id']!r}"
    except Exception:  # noqa: BLE001 - only for the message: the duplicate is the error
        return "not a valid record"


@dataclass(frozen=True)
class VectorReport:
    """What ``check_vectors`` read: how many vectors, all of them or a sample."""

    checked: int
    total: int
    normalized: bool

    def summary(self) -> str:
        which = f"all {self.total}" if self.checked == self.total else f"{self.checked} of {self.total} (sample)"
        norm = ", unit norm" if self.normalized else ""
        return f"vectors checked: {which}: finite, not all zero{norm}"


class _VectorStats:
    """Problems found over the rows read so far, raised in order of what matters."""

    def __init__(self, path: Path, normalized: bool) -> None:
        self.path, self.normalized = path, normalized
        self.checked = self.zero = self.off = 0
        self.first_zero = self.first_off = -1
        self.off_norm = 0.0

    def add(self, ids: np.ndarray, x: np.ndarray, what: str) -> None:
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise IndexIntegrityError(self.path, f"the vector of chunk {int(ids[bad][0])} is not finite (NaN or "
                                      f"infinite; {int(bad.sum())} of {len(ids)} {what}): searches would return "
                                      "no sources for it")
        norms = np.linalg.norm(x, axis=1)
        zero = norms == 0
        off = np.flatnonzero(~zero & (np.abs(norms - 1) > NORM_TOLERANCE))
        if zero.any() and self.first_zero < 0:
            self.first_zero = int(ids[zero][0])
        if len(off) and self.first_off < 0:
            self.first_off, self.off_norm = int(ids[off[0]]), float(norms[off[0]])
        self.checked, self.zero, self.off = self.checked + len(ids), self.zero + int(zero.sum()), self.off + len(off)

    def finish(self, what: str) -> None:
        if self.checked and self.zero == self.checked:
            raise IndexIntegrityError(self.path, f"all {self.checked} vectors {what} are zero: every score would be 0")
        if not self.normalized:
            return
        if self.zero:
            raise IndexIntegrityError(self.path, f"the vector of chunk {self.first_zero} is zero ({self.zero} of "
                                      f"{self.checked} {what}), although the manifest says the embeddings are normalized")
        if self.off:
            raise IndexIntegrityError(self.path, f"the vector of chunk {self.first_off} has norm {self.off_norm:.3f} "
                                      f"({self.off} of {self.checked} {what} are not of unit norm), although the "
                                      "manifest says the embeddings are normalized: scores would not be cosines")


def check_vectors(manifest: Manifest, index: FaissIndex, *, every: bool = False) -> VectorReport:
    """The index's vectors are finite and not all zero, and of unit norm when the manifest
    says ``embedding.normalized``: a ``SAMPLE`` of them (cheap at any size), or with
    ``every`` all of them, a block at a time."""
    normalized = (manifest.data.get("embedding") or {}).get("normalized") is True
    stats = _VectorStats(manifest.folder / INDEX_FILE, normalized)
    what = "read" if every else "sampled"
    if every:
        # NOTE: blocks of up to 256 MiB of float32: each IVF block scans every list's ids
        # (reconstruct_n), so fewer, larger blocks (100k IVF vectors: 4.7 s in 32k-row blocks, 2.8 s in one).
        block = max(_BLOCK, (1 << 28) // (4 * max(index.dim, 1)))
        for start in range(0, index.ntotal, block):
            count = min(block, index.ntotal - start)
            stats.add(np.arange(start, start + count), index.vectors(start, count), what)
    else:
        stats.add(*index.sample(SAMPLE), what)
    stats.finish(what)
    return VectorReport(stats.checked, index.ntotal, normalized)


def check_reused(folder: Path, runs: Iterable[tuple[int, np.ndarray]], normalized: bool) -> None:
    """Vectors read back from a previous index before a build reuses them, as runs of
    (first chunk id there, rows): the same tests as ``check_vectors``, on exactly the rows
    reused, a block at a time (no copy of them)."""
    stats = _VectorStats(Path(folder) / INDEX_FILE, normalized)
    for first, rows in runs:
        for start in range(0, len(rows), _BLOCK):
            block = rows[start:start + _BLOCK]
            stats.add(np.arange(first + start, first + start + len(block)), block, "reused")
    stats.finish("reused")


def load_checked(manifest: Manifest, *, every: bool = False, **load: Any) -> tuple[FaissIndex, VectorReport]:
    """Map the folder's FAISS index (``FaissIndex.load``, ``load`` its query settings) and
    check its vectors; the caller has verified the hashes and structure first."""
    index = FaissIndex.load(manifest.folder, IndexSpec.from_manifest(manifest.data["index"]), **load)
    return index, check_vectors(manifest, index, every=every)
