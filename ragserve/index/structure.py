"""Structural checks of an index folder: its files must agree with each other and with the
manifest, not only with their hashes.

Hashes prove that the files are the ones the manifest lists; they say nothing when the
manifest itself was rewritten to match other files (a valid FAISS file of another
dimension, one holding twice the docstore's vectors). Such a folder used to open without
error and fail at the first query. ``check_structure`` reads headers, the offsets array and
(vectorised) the docstore's lines, so it costs about as much as hashing the docstore:

- ``index.faiss``: the FAISS header, parsed here without importing FAISS (a crafted file
  never reaches FAISS's reader): the type tag matches the manifest's index type, the
  metric is inner product, the dimension is the manifest's embedding dimension, the vector
  count is the manifest's chunk count (and ``index.ntotal``), an IVF index has the
  manifest's ``nlist``.
- the docstore: ``chunks.offsets.npy`` is a 1-d uint64 array of chunks + 1 entries that
  starts at 0, rises strictly, ends at the size of ``chunks.jsonl``, and every entry but
  the first points just past a newline (each chunk is one whole line).
- a manifest that describes an index (an index type, or any index file present or listed)
  must list all three files, so nothing that is opened escapes the hash check.
- then what the docstore holds (``contents.py``): the corpus's per-file chunk ranges tile
  the chunk ids exactly once, each record belongs to the file whose range holds it, and
  no record appears twice. The vectors themselves are checked where FAISS maps the
  index (``contents.check_vectors``), after all of this.

``verify()`` (verify.py) runs it after the hashes, so ``RAG.from_index`` and ``ragserve
verify-index`` both refuse such a folder with an ``IndexIntegrityError`` naming the file.

**Usage:** ``report = check_structure(read_manifest(folder)); print(report.summary())``
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ragserve.errors import IndexIntegrityError
from ragserve.index.contents import check_corpus, check_records
from ragserve.retrieval.docstore import CHUNKS_FILE, OFFSETS_FILE
from ragserve.retrieval.faiss_index import INDEX_FILE

if TYPE_CHECKING:
    from ragserve.index.manifest import Manifest

INDEX_FILES = (INDEX_FILE, CHUNKS_FILE, OFFSETS_FILE)

# FAISS's type tag for each index type ragserve builds (faiss/impl/index_write.cpp).
FOURCC = {"flat-fp16": b"IxSQ", "flat-fp32": b"IxFI", "ivf-fp16": b"IwSq", "hnsw-fp16": b"IHNs"}
# fourcc, d, ntotal, two unused int64, is_trained, metric_type: FAISS's write_index_header.
_HEADER = struct.Struct("<4siqqq?i")
_IVF_NLIST = struct.Struct("<Q")  # the first field after an IVF index's header
_METRIC_INNER_PRODUCT = 0


@dataclass(frozen=True)
class StructureReport:
    index_type: str
    dim: int
    vectors: int
    chunks: int
    nlist: int = 0
    files: int = -1
    """Source files whose chunk ranges were checked (-1: the manifest records no corpus)."""

    def summary(self) -> str:
        ivf = f", {self.nlist} lists" if self.nlist else ""
        lines = f" = {self.chunks} docstore lines" if self.chunks >= 0 else " (no docstore)"
        vectors = f"{self.vectors} vectors" if self.vectors >= 0 else "vectors (no count recorded)"
        return f"{self.index_type} ({FOURCC[self.index_type].decode()}{ivf}), {self.dim}-d, inner product, {vectors}{lines}"

    def contents(self) -> str:
        """What ``contents.py`` checked of the docstore."""
        if self.chunks < 0:
            return "no docstore"
        ranges = (f"the chunk ranges of {self.files} source files cover chunks 0–{self.chunks - 1} once, "
                  "each record in its file's range; " if self.files >= 0 else "")
        return f"{ranges}no record twice"


def check_structure(manifest: Manifest) -> StructureReport | None:
    """Check an index folder's structure against its manifest; ``None`` when the manifest
    describes no index at all (no index type, no index file present or listed).

    Every index file present in the folder must be listed (so it was hashed); a listed
    FAISS file is checked against the manifest, a listed docstore against its own lines,
    and the two against each other and ``counts.chunks``.
    """
    folder, data = manifest.folder, manifest.data
    section = data.get("index") if isinstance(data.get("index"), dict) else {}
    listed = data.get("files") or {}
    unlisted = [n for n in INDEX_FILES if n not in listed and (folder / n).exists()]
    if unlisted:
        raise IndexIntegrityError(folder / "manifest.json", f"does not list {', '.join(unlisted)}: "
                                  "a file the index opens would escape the hash check")
    if not section.get("type") and not any(n in listed for n in INDEX_FILES):
        return None
    chunks = _manifest_int(manifest, ("counts", "chunks")) if "chunks" in (data.get("counts") or {}) else None
    if chunks is not None and "ntotal" in section and section["ntotal"] != chunks:
        raise IndexIntegrityError(folder / "manifest.json",
                                  f"index.ntotal {section['ntotal']} differs from counts.chunks {chunks}")
    lines, files = None, -1
    if CHUNKS_FILE in listed or OFFSETS_FILE in listed:
        if CHUNKS_FILE not in listed or OFFSETS_FILE not in listed:
            raise IndexIntegrityError(folder / "manifest.json", f"lists only half of the docstore "
                                      f"({CHUNKS_FILE if CHUNKS_FILE in listed else OFFSETS_FILE})")
        if chunks is None:
            raise IndexIntegrityError(folder / "manifest.json", "counts.chunks is missing")
        lines = check_offsets(folder, chunks)
        ranges = check_corpus(manifest, lines)
        check_records(folder, ranges)
        files = len(ranges) if "corpus" in data else -1
    index_type = section.get("type")
    if index_type not in FOURCC:
        raise IndexIntegrityError(folder / "manifest.json", f"unknown index type {index_type!r}; "
                                  f"known: {', '.join(FOURCC)}")
    if INDEX_FILE not in listed:
        raise IndexIntegrityError(folder / "manifest.json", f"describes a {index_type} index but does not "
                                  f"list {INDEX_FILE}")
    dim = _manifest_int(manifest, ("embedding", "dim"))
    count = chunks if chunks is not None else section.get("ntotal")
    nlist = check_faiss_header(folder / INDEX_FILE, index_type, dim, count,
                               int((section.get("params") or {}).get("nlist", 0)))
    return StructureReport(index_type, dim, count if count is not None else -1,
                           lines if lines is not None else -1, nlist, files)


def check_faiss_header(path: Path, index_type: str, dim: int, count: int | None, nlist: int = 0) -> int:
    """Compare the FAISS file's own header with what the manifest says (``count`` None:
    the manifest records none); returns its nlist."""
    with open(path, "rb") as f:
        head = f.read(_HEADER.size + _IVF_NLIST.size)
    if len(head) < _HEADER.size:
        raise IndexIntegrityError(path, f"too short for a FAISS index ({len(head)} bytes)")
    fourcc, d, ntotal, _, _, trained, metric = _HEADER.unpack_from(head)
    expected = FOURCC[index_type]
    if fourcc != expected:
        found = next((t for t, c in FOURCC.items() if c == fourcc), None)
        what = f"a {found} index" if found else f"FAISS type tag {fourcc!r}"
        raise IndexIntegrityError(path, f"holds {what}; the manifest says {index_type} ({expected.decode()})")
    if metric != _METRIC_INNER_PRODUCT:
        raise IndexIntegrityError(path, f"uses FAISS metric {metric}, not inner product (0): scores would not "
                                  "be cosine similarities")
    if d != dim:
        raise IndexIntegrityError(path, f"holds {d}-d vectors; the manifest says {dim}-d embeddings")
    if count is not None and ntotal != count:
        raise IndexIntegrityError(path, f"holds {ntotal} vectors; the manifest and docstore say {count} chunks")
    if not trained:
        raise IndexIntegrityError(path, "is not trained: it cannot be searched")
    if index_type != "ivf-fp16":
        return 0
    if len(head) < _HEADER.size + _IVF_NLIST.size:
        raise IndexIntegrityError(path, "too short for an IVF index")
    (found_nlist,) = _IVF_NLIST.unpack_from(head, _HEADER.size)
    if nlist and found_nlist != nlist:
        raise IndexIntegrityError(path, f"has {found_nlist} inverted lists; the manifest says {nlist}")
    return int(found_nlist)


def check_offsets(folder: Path, chunks: int) -> int:
    """The docstore's offsets describe exactly ``chunks`` whole lines of ``chunks.jsonl``;
    returns that count."""
    path = folder / OFFSETS_FILE
    try:
        offsets = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:  # not an .npy file, or an object array (pickle)
        raise IndexIntegrityError(path, f"not a plain .npy array: {e}") from None
    if offsets.dtype != np.uint64 or offsets.ndim != 1:
        raise IndexIntegrityError(path, f"expected a 1-d uint64 array, got {offsets.dtype} of shape {offsets.shape}")
    if len(offsets) != chunks + 1:
        raise IndexIntegrityError(path, f"describes {len(offsets) - 1} chunks; the manifest and index say {chunks}")
    size = (folder / CHUNKS_FILE).stat().st_size
    if chunks == 0 or int(offsets[0]) != 0 or int(offsets[-1]) != size:
        raise IndexIntegrityError(path, f"offsets run from {int(offsets[0])} to {int(offsets[-1])}; "
                                  f"{CHUNKS_FILE} has {size} bytes")
    if not bool(np.all(offsets[1:] > offsets[:-1])):
        raise IndexIntegrityError(path, "offsets are not strictly increasing")
    with open(folder / CHUNKS_FILE, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        # the last byte of every chunk (a copy: no view into the map outlives it)
        ends = np.frombuffer(m, dtype=np.uint8)[(offsets[1:] - 1).astype(np.int64)]
    split = np.flatnonzero(ends != ord("\n"))
    if len(split):
        raise IndexIntegrityError(folder / CHUNKS_FILE, f"chunk {int(split[0])} does not end at a line end: "
                                  "the offsets do not match the lines")
    return chunks


def _manifest_int(manifest: Manifest, keys: tuple[str, str]) -> int:
    value: Any = manifest.data.get(keys[0])
    value = value.get(keys[1]) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IndexIntegrityError(manifest.folder / "manifest.json",
                                  f"{'.'.join(keys)} must be a non-negative integer, got {value!r}")
    return value
