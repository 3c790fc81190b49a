"""``verify``: an index folder still holds what its manifest says, and its files agree.

NOTE: FAISS loads a file with a flipped payload byte without complaint and returns
results, so ``verify()`` hashes every file before anything is served (about 0.06 s per
100 MB here). Hashes cannot vouch for a manifest re-hashed over bad files, so the files
are then checked against each other (``structure.py``: headers, counts, offsets; then
``contents.py``: chunk ranges, docstore records, vectors).

A sharded index (``shards.py``) is checked shard by shard, each as a whole index folder,
then against the top manifest (fingerprints, dimension, type, shared IVF quantizer); any
failure is a ``ShardError`` naming the shard, and the whole set is refused.

**Usage:** ``manifest = verify("indexes/docs")``; ``check_index(folder, vectors="all")``
for every vector and the reports ``verify-index`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ragserve.errors import IndexError_, IndexIntegrityError, ShardError
from ragserve.index.contents import VectorReport, load_checked
from ragserve.index.manifest import Manifest, read_manifest, sha256_file
from ragserve.index.shards import ShardEntry, check_quantizer, check_shard, is_sharded, shard_entries
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
    shards: tuple[Verified, ...] = ()
    """A sharded index: each shard as checked (its own manifest, structure, vectors); the
    top manifest itself describes no index file (``structure`` is None)."""


def check_index(folder: Path | str, *, vectors: Vectors = "sample") -> Verified:
    """Check every file against the manifest (present, same size, same SHA-256), then the
    folder's structure and contents, then ``vectors``; returns what was checked."""
    manifest = read_manifest(folder)
    if is_sharded(manifest.data):
        return _check_sharded(manifest, vectors)
    _check_files(manifest)
    # The files agree with the manifest; now with each other, not only with their hashes.
    structure = check_structure(manifest)
    report = None
    if structure is not None and vectors != "none":
        report = load_checked(manifest, every=vectors == "all")[1]
    return Verified(manifest, structure, report)


def _check_files(manifest: Manifest) -> None:
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


def _check_sharded(manifest: Manifest, vectors: Vectors) -> Verified:
    """Every shard as a whole index folder, then against the top manifest, then the top
    manifest's own files (the shards' manifests, by hash)."""
    shards = []
    for entry in shard_entries(manifest):
        shards.append(check_one_shard(manifest, entry, vectors))
    _check_files(manifest)
    return Verified(manifest, None, None, tuple(shards))


def check_one_shard(top: Manifest, entry: ShardEntry, vectors: Vectors) -> Verified:
    """One shard of ``top``: its own files and structure, then against the top manifest
    (a shard actor of ``serve --ray`` checks the shards it holds with this)."""
    folder = top.folder / entry.name
    if not folder.is_dir() or folder.is_symlink():
        raise ShardError(folder, entry.name, "missing: the top manifest lists it, the folder is not there")
    try:
        checked = check_index(folder, vectors="none")
        check_shard(top, entry, checked.manifest)
        report = None
        if checked.structure is not None and vectors != "none":
            index, report = load_checked(checked.manifest, every=vectors == "all")
            check_quantizer(top, entry, index.centroids())
    except ShardError:
        raise
    except IndexError_ as e:  # the shard's own check failed: say which shard
        raise ShardError(e.path, entry.name, e.detail) from None
    return Verified(checked.manifest, checked.structure, report)


def verify(folder: Path | str, *, vectors: Vectors = "sample") -> Manifest:
    """``check_index``, for its manifest: raises ``IndexIntegrityError`` (naming the file and
    what is wrong), ``IndexNotFoundError`` or ``IndexMismatchError``."""
    return check_index(folder, vectors=vectors).manifest
