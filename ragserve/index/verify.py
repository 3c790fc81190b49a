"""``verify``: an index folder still holds what its manifest says, and its files agree.

NOTE: FAISS loads a file with a flipped payload byte without complaint and returns
results, so ``verify()`` hashes every file before anything is served (about 0.06 s per
100 MB here). Hashes cannot vouch for a manifest re-hashed over bad files, so the files
are then checked against each other (``structure.py``: headers, counts, offsets; then
``contents.py``: chunk ranges, docstore records, vectors).

**Usage:** ``manifest = verify("indexes/docs")``; ``check_index(folder, vectors="all")``
for every vector and the reports ``verify-index`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ragserve.errors import IndexIntegrityError
from ragserve.index.contents import VectorReport, load_checked
from ragserve.index.manifest import Manifest, read_manifest, sha256_file
from ragserve.index.structure import StructureReport, check_structure

Vectors = Literal["sample", "all", "none"]
"""Which vectors ``verify`` reads: a sample spread over the index (cheap at any size:
what opening does), all of them (``verify-index``), or none (the caller maps the index
itself and calls ``contents.check_vectors`` on it, as ``open_index`` does)."""


@dataclass(frozen=True)
class Verified:
    manifest: Manifest
    structure: StructureReport | None
    """None: the manifest describes no index."""
    vectors: VectorReport | None
    """None: no index, or ``vectors="none"``."""


def check_index(folder: Path | str, *, vectors: Vectors = "sample") -> Verified:
    """Check every file against the manifest (present, same size, same SHA-256), then the
    folder's structure and contents, then ``vectors``; returns what was checked."""
    manifest = read_manifest(folder)
    for name, meta in manifest.data["files"].items():
        path = manifest.folder / name
        if not path.is_file():
            raise IndexIntegrityError(path, "missing (listed in the manifest)")
        size = path.stat().st_size
        if size != meta["bytes"]:
            what = "truncated" if size < meta["bytes"] else "grown"
            raise IndexIntegrityError(path, f"{what}: {size} bytes, the manifest says {meta['bytes']}")
        if sha256_file(path) != meta["sha256"]:
            raise IndexIntegrityError(path, "altered: SHA-256 differs from the manifest")
    # The files agree with the manifest; now with each other, not only with their hashes.
    structure = check_structure(manifest)
    report = None
    if structure is not None and vectors != "none":
        report = load_checked(manifest, every=vectors == "all")[1]
    return Verified(manifest, structure, report)


def verify(folder: Path | str, *, vectors: Vectors = "sample") -> Manifest:
    """``check_index``, for its manifest: raises ``IndexIntegrityError`` (naming the file and
    what is wrong), ``IndexNotFoundError`` or ``IndexMismatchError``."""
    return check_index(folder, vectors=vectors).manifest
