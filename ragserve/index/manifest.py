"""``manifest.json``: what an index folder holds (``verify.py`` checks that it still does).

The manifest records the format version, the embedding model and dimension, the chunking
parameters, the index type, counts, and the SHA-256 and size of every file. Its
``fingerprint`` is a SHA-256 over all of that (not over the creation time), so any change
to a document, a model or a parameter gives a new fingerprint: cache keys include it, and
no answer computed against another index is ever served.

Format 2 adds ``corpus`` (path, SHA-256 and chunk range of every source file, what an
incremental build compares) and ``build`` (how this folder was made: full or incremental
and why, what was reused). ``build`` is left out of the fingerprint like ``created_at``:
it says how the folder was produced, not what it holds, so an incremental build that
gives the same files as a full build gives the same fingerprint. Format 1 is still read.

``read_manifest`` resolves the path once (an index path is usually a link to the current
version, see ``versions.py``): ``Manifest.folder`` is the real folder, and everything
opened through it stays on that version when a later build flips the link.

"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ragserve.errors import IndexIntegrityError, IndexMismatchError, IndexNotFoundError, IndexWriteError
from ragserve.index.versions import resolve_index

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_UNHASHED = ("created_at", "fingerprint", "build")


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def fingerprint(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k not in _UNHASHED}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """Hash ``files`` (relative to folder) into the manifest, fingerprint it, write it."""
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = {
        name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for name in sorted(files)
    }
    manifest["fingerprint"] = fingerprint(manifest)
    data = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    with IndexWriteError.during("write", folder / MANIFEST_FILE):
        (folder / MANIFEST_FILE).write_bytes(data + b"\n")
    return manifest


@dataclass(frozen=True)
class Manifest:
    folder: Path
    data: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.data["fingerprint"]

    @property
    def dim(self) -> int:
        return int(self.data["embedding"]["dim"])

    @property
    def embedding(self) -> dict[str, Any]:
        return self.data["embedding"]


def read_manifest(folder: Path | str) -> Manifest:
    """Parse the manifest of the folder ``folder`` names now; errors name the folder and
    what is wrong."""
    given = Path(folder)
    folder = resolve_index(given)
    if not folder.is_dir():
        raise IndexNotFoundError(given)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise IndexNotFoundError(folder, f"no {MANIFEST_FILE} in the folder")
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise IndexIntegrityError(path, f"not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise IndexIntegrityError(path, "not a JSON object")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise IndexMismatchError(
            path, f"format version {version!r}, this ragserve reads {', '.join(map(str, READABLE_VERSIONS))}; "
                  "rebuild the index"
        )
    for key in ("embedding", "chunking", "index", "counts", "files", "fingerprint"):
        if key not in data:
            raise IndexIntegrityError(path, f"missing key {key!r}")
    if data["fingerprint"] != fingerprint(data):
        raise IndexIntegrityError(path, "the manifest was edited: its fingerprint does not match its content")
    return Manifest(folder=folder, data=data)


def check_embedding(manifest: Manifest, identity: dict[str, Any], dim: int) -> None:
    """Refuse to serve an index with an embedder other than the one that built it."""
    built = manifest.embedding
    if int(built["dim"]) != dim:
        raise IndexMismatchError(
            manifest.folder,
            f"built with {built['dim']}-d embeddings, the configured model gives {dim}-d",
        )
    if built.get("identity") != identity.get("identity"):
        raise IndexMismatchError(
            manifest.folder,
            f"built with embedding model {built.get('name')!r} ({built.get('identity', '')[:12]}), "
            f"configured: {identity.get('name')!r} ({identity.get('identity', '')[:12]}); "
            "set embed.model to the model the index was built with, or rebuild",
        )
