"""The sharded index layout: one index made of N shard folders, and what must hold between
them before any of it is served.

Layout of one version (``versions.py`` versions it like any index folder)::

    indexes/NAME -> .NAME.v/<version>/
        manifest.json          the top manifest: ``shards`` lists each shard's name,
                               fingerprint and chunk range; ``files`` lists (and hashes)
                               every shard's manifest.json, so the top fingerprint covers
                               every file of every shard
        shard-000/             a whole index folder: index.faiss, the docstore, its own
        shard-001/             manifest (with its files' corpus records and hashes)
        ...

Chunk ids are global and shard-major: shard i holds the ids ``first_chunk ..
first_chunk + chunks - 1`` of the top manifest, stored there as its own 0..chunks-1. A
source file goes to shard ``shard_of(path, N)`` (a hash of its path), so it stays in one
shard for the life of the index and an incremental build rewrites only the shards whose
files changed; the others are hard-linked into the new version unchanged.

IVF shards share one coarse quantizer, trained once on a sample of the whole corpus
(``build/sharded.py``): each shard's manifest records its SHA-256 and ``check_shard``
refuses a set whose shards disagree, because scores from different quantizers are not
comparable and the merged top-k would no longer be the one index's top-k.

Every refusal is a ``ShardError`` naming the shard (an ``IndexIntegrityError``).

**Usage:** ``entries = shard_entries(manifest); check_shard(manifest, entries[0], read_manifest(...))``
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ragserve.errors import IndexIntegrityError, ShardError

if TYPE_CHECKING:
    from ragserve.index.manifest import Manifest

LAYOUT = "sharded"
"""The top manifest's ``layout``."""
SHARD_PREFIX = "shard-"
MANIFEST_FILE = "manifest.json"
_SAME = ("chunking",)  # sections every shard must share with the top manifest, exactly


def shard_name(number: int) -> str:
    """``shard-000``: the folder of shard ``number``."""
    return f"{SHARD_PREFIX}{number:03d}"


def shard_of(doc_id: str, shards: int) -> int:
    """The shard a source file's chunks go to: the first 8 bytes of the SHA-256 of its path
    (relative to the source folder), modulo the shard count. Stable across builds,
    processes and machines (unlike Python's ``hash``), and spread evenly."""
    digest = hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def is_sharded(data: dict[str, Any]) -> bool:
    """Whether a manifest is the top manifest of a sharded index."""
    return data.get("layout") == LAYOUT or "shards" in data


def centroids_sha256(centroids: np.ndarray) -> str:
    """The identity of an IVF coarse quantizer (its float32 centroids), recorded in every
    IVF shard's manifest and the top one."""
    return hashlib.sha256(np.ascontiguousarray(centroids, dtype=np.float32).tobytes()).hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the top manifest lists it: global chunk ids ``first_chunk ..
    first_chunk + chunks - 1``."""

    name: str
    fingerprint: str
    first_chunk: int
    chunks: int


def shard_entries(manifest: Manifest) -> list[ShardEntry]:
    """The top manifest's shards, checked: named ``shard-NNN`` once each, their chunk ranges
    tiling 0..counts.chunks-1 in order, each shard's manifest listed in ``files``."""
    path = manifest.folder / MANIFEST_FILE
    data = manifest.data
    listed = data.get("shards")
    if not isinstance(listed, list) or not listed:
        raise IndexIntegrityError(path, "a sharded index must list its shards (a non-empty list)")
    entries, covered = [], 0
    for i, raw in enumerate(listed):
        if not isinstance(raw, dict):
            raise IndexIntegrityError(path, f"shards[{i}] is not an object")
        name, fp, first, count = (raw.get(k) for k in ("name", "fingerprint", "first_chunk", "chunks"))
        if name != shard_name(i):
            raise IndexIntegrityError(path, f"shards[{i}] is named {name!r}, expected {shard_name(i)!r}")
        if not isinstance(fp, str) or len(fp) != 64:
            raise ShardError(
                manifest.folder / name, name, f"the top manifest records no fingerprint ({fp!r})"
            )
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (first, count)) or count < 1:
            raise ShardError(
                manifest.folder / name,
                name,
                f"chunk range first_chunk {first!r}, chunks {count!r} is not a range of at least one chunk",
            )
        if first != covered:
            raise ShardError(
                manifest.folder / name,
                name,
                f"its chunks start at {first}; the shards before it end "
                f"at {covered - 1}: the ranges must tile the chunk ids in order",
            )
        if f"{name}/{MANIFEST_FILE}" not in (data.get("files") or {}):
            raise ShardError(
                manifest.folder / name, name, "its manifest is not listed (hashed) in the top manifest"
            )
        entries.append(ShardEntry(name, fp, first, count))
        covered += count
    total = (data.get("counts") or {}).get("chunks")
    if total != covered:
        raise IndexIntegrityError(path, f"the shards hold {covered} chunks; counts.chunks says {total}")
    if (data.get("counts") or {}).get("shards") != len(entries):
        raise IndexIntegrityError(
            path,
            f"lists {len(entries)} shards; counts.shards says {(data.get('counts') or {}).get('shards')}",
        )
    return entries


def check_shard(top: Manifest, entry: ShardEntry, shard: Manifest) -> None:
    """One shard's own (verified) manifest agrees with the top manifest: the fingerprint the
    top lists, its chunk count, the same embedding model and dimension, chunking, index
    type and parameters, and (IVF) the shared quantizer. A shard may not be sharded."""

    def refuse(message: str) -> ShardError:
        return ShardError(shard.folder, entry.name, message)

    if is_sharded(shard.data):
        raise refuse("is itself a sharded index; shards must be plain index folders")
    if shard.fingerprint != entry.fingerprint:
        raise refuse(
            f"fingerprint {shard.fingerprint[:12]}, the top manifest lists {entry.fingerprint[:12]}: "
            "it is another build's shard (mixed versions are never served together)"
        )
    t_emb, s_emb = top.data["embedding"], shard.data["embedding"]
    if int(s_emb.get("dim", -1)) != int(t_emb["dim"]):
        raise refuse(f"holds {s_emb.get('dim')}-d embeddings; the index is {t_emb['dim']}-d")
    if s_emb.get("identity") != t_emb.get("identity"):
        raise refuse(
            f"built with embedding model {s_emb.get('name')!r}; the index with {t_emb.get('name')!r}"
        )
    for key in _SAME:
        if shard.data.get(key) != top.data.get(key):
            raise refuse(f"its {key} differs from the top manifest's")
    chunks = (shard.data.get("counts") or {}).get("chunks")
    if chunks != entry.chunks:
        raise refuse(f"holds {chunks} chunks; the top manifest gives it {entry.chunks}")
    t_idx, s_idx = top.data["index"], shard.data["index"]
    if s_idx.get("type") != t_idx.get("type") or s_idx.get("params") != t_idx.get("params"):
        raise refuse(
            f"is a {s_idx.get('type')} index {s_idx.get('params')}; the index is {t_idx.get('type')} "
            f"{t_idx.get('params')}"
        )
    if t_idx.get("type") == "ivf-fp16":
        want = (t_idx.get("quantizer") or {}).get("sha256")
        got = (s_idx.get("quantizer") or {}).get("sha256")
        if not want or got != want:
            raise refuse(
                f"IVF coarse quantizer {str(got)[:12]}, the index's shared one is {str(want)[:12]}: "
                "scores across shards would not be comparable"
            )


def check_quantizer(top: Manifest, entry: ShardEntry, centroids: np.ndarray | None) -> None:
    """The centroids a mapped IVF shard really holds are the shared quantizer the manifests
    name (the recorded SHA-256 is only a claim until the file is read)."""
    want = (top.data["index"].get("quantizer") or {}).get("sha256")
    if top.data["index"].get("type") != "ivf-fp16" or centroids is None:
        return
    got = centroids_sha256(centroids)
    if got != want:
        raise ShardError(
            top.folder / entry.name,
            entry.name,
            f"index.faiss holds coarse quantizer {got[:12]}, "
            f"not the shared {str(want)[:12]} the manifests record",
        )
