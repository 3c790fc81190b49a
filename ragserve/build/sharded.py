"""``build_sharded``: a corpus into N shard folders under one index (``index/shards.py``).

Each source file goes to shard ``shard_of(path, N)``; each shard is planned, read and
embedded like a whole index of its own files (``incremental.py``), against the same shard
of the previous version. A shard none of whose files changed is hard-linked into the new
version unchanged (same files, same fingerprint); only the others are rebuilt. The top
manifest and the flip make the new shards visible together: a server that reloads sees
one version of every shard.

Index types: flat and HNSW shards need nothing shared. IVF shards share one coarse
quantizer, so their scores are comparable and the merged top-k at a given nprobe is the
one an unsharded IVF index with those centroids returns: it is trained once on a seeded
sample of the whole corpus (``plan_index`` of the total chunk count sizes it), or reused
from the previous version while it still fits (``reuse_ivf_quantizer`` and ``drift``, as
for one index). A retrained quantizer rebuilds every shard, since every list changes.

The index type and its parameters are planned from the total chunk count, the same for
every shard (``auto`` picks by the whole corpus).

**Usage:** ``report = build_sharded("docs/", "indexes/docs", shards=4)``
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragserve.build.builder import (
    BuildReport,
    ProgressFn,
    embed_texts,
    embedding_record,
    gathered_vectors,
    open_previous,
    ready_embedder,
)
from ragserve.build.incremental import BuildPlan, Gathered, gather, plan_build, scan_source
from ragserve.build.ingest import FileOutcome
from ragserve.build.textfile import check_encoding
from ragserve.config import RAGConfig
from ragserve.errors import ConfigError, IndexError_, IndexIntegrityError, IngestError
from ragserve.index.manifest import Manifest
from ragserve.index.shards import centroids_sha256, is_sharded, shard_name, shard_of
from ragserve.index.verify import check_index
from ragserve.index.writer import chunking_section, link_shard, publish_shard_set, write_index_folder
from ragserve.retrieval.faiss_index import INDEX_FILE, FaissIndex, ivf_sample_rows, quantizer_fit
from ragserve.retrieval.index_spec import IndexSpec, drift, plan_index, requested_build, reuse_ivf_quantizer
from ragserve.types import Embedder


@dataclass
class _Shard:
    number: int
    plan: BuildPlan
    gathered: Gathered | None = None
    vectors: np.ndarray | None = None
    linked: bool = False

    @property
    def name(self) -> str:
        return shard_name(self.number)

    @property
    def unchanged(self) -> bool:
        return self.plan.changes_nothing and self.plan.previous is not None

    @property
    def previous_chunks(self) -> int:
        return int(self.plan.previous.data["counts"]["chunks"]) if self.plan.previous is not None else 0


def shard_count(config: RAGConfig, shards: int | None) -> int:
    """The shard count a build asked for (default ``index.shards``), or ConfigError."""
    n = config.index.shards if shards is None else shards
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4096:
        raise ConfigError("index.shards", f"a sharded build needs 1..4096 shards, got {n!r}")
    return n


def build_sharded(
    source: Path | str,
    out: Path | str,
    config: RAGConfig | None = None,
    *,
    shards: int | None = None,
    embedder: Embedder | None = None,
    encoding: str | None = None,
    progress: ProgressFn | None = None,
    full: bool = False,
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> BuildReport:
    """Build or update the sharded index at ``out`` (``shards``: default ``index.shards``).

    ``embed`` turns the new chunks of every rebuilt shard (all together, in the corpus's
    order) into vectors, as ``finish_build``'s does: default ``embedder`` in this process,
    ``embed_slices`` at a time; ``ray/build.py`` passes its actors' (``build-index --shards
    --ray``).

    **Usage:** ``build_sharded("docs/", "indexes/docs", shards=4)``; ``full=True`` re-embeds everything.
    """
    config = config or RAGConfig.load()
    n = shard_count(config, shards)
    check_encoding(encoding)
    out = Path(out)
    t0 = time.perf_counter()
    embedder, tokenizer = ready_embedder(config, embedder)
    files = scan_source(source, progress)
    previous, why = _previous_set(out, n, full)
    chunking = chunking_section(config.chunk)
    groups: list[list[Any]] = [[] for _ in range(n)]
    for f in files:
        groups[shard_of(f.doc_id, n)].append(f)
    parts = []
    for i, group in enumerate(groups):
        prior = previous.folder / shard_name(i) if previous is not None else out / ".no-previous-shard"
        plan = plan_build(
            group,
            prior,
            identity=embedder.identity,
            chunking=chunking,
            encoding=encoding,
            full=previous is None,
        )
        if previous is None:
            plan.reason = why
        parts.append(_Shard(i, plan))
    timings = {"scan": time.perf_counter() - t0}
    t = time.perf_counter()
    c = config.chunk
    read = {
        "chunk_size": c.chunk_size,
        "chunk_overlap": c.chunk_overlap,
        "tokenizer": tokenizer,
        "encoding": encoding,
        "max_bytes": int(c.max_file_mb * 2**20),
    }
    for s in parts:
        if not s.unchanged:
            s.gathered = gather(s.plan, **read)
    timings["read"] = time.perf_counter() - t
    outcomes = _outcomes(parts)
    if not any(o.status == "ok" for o in outcomes):
        reasons = "; ".join(f"{o.path}: {o.reason}" for o in outcomes[:5]) or "the folder is empty"
        raise IngestError(f"{source}: no readable documents ({reasons})")
    total = sum(len(s.gathered.chunks) if s.gathered is not None else s.previous_chunks for s in parts)
    spec = plan_index(total, config.index)
    if previous is not None and not _same_index(previous, spec, config):
        for s in parts:  # another index type or parameters: every shard is rebuilt from its vectors
            if s.gathered is None:
                s.gathered = gather(s.plan, **read)
    t = time.perf_counter()
    _embed_shards(parts, files, embedder, config, progress, embed)
    timings["embed"] = time.perf_counter() - t
    t = time.perf_counter()
    spec, centroids, quantizer = _shared_quantizer(
        spec, parts, previous, config, read, embedder, {f.doc_id: i for i, f in enumerate(files)}
    )
    empty = [s.name for s in parts if (len(s.gathered.chunks) if s.gathered else s.previous_chunks) == 0]
    if empty:
        raise IngestError(
            f"{source}: shard{'s' * (len(empty) > 1)} {', '.join(empty)} would hold no chunks "
            f"({len(files)} files over {n} shards): build with fewer shards"
        )
    dim = embedder.dim
    embedding = embedding_record(embedder, config, dim)
    index_extra = {"quantizer": quantizer["record"]} if quantizer is not None else None

    def write_shards(folder: Path) -> list[tuple[str, dict[str, Any]]]:
        written = []
        for s in parts:
            if s.gathered is None:
                assert s.plan.previous is not None
                s.linked = True
                written.append((s.name, link_shard(s.plan.previous.folder, folder / s.name)))
                continue
            index = FaissIndex.build(s.vectors, spec, progress=progress, centroids=centroids)  # type: ignore[arg-type]
            (folder / s.name).mkdir()
            written.append(
                (
                    s.name,
                    write_index_folder(
                        folder / s.name,
                        index,
                        chunks=s.gathered.chunks,
                        embedding=embedding,
                        chunking=chunking,
                        counts=_counts(s.gathered.outcomes, s.gathered.documents, len(s.gathered.chunks)),
                        index_extra=index_extra,
                        extra={
                            "skipped": _skipped(s.gathered.outcomes),
                            "corpus": {"encoding": encoding, "files": s.gathered.corpus},
                            "build": _build_record(s.plan, s.gathered),
                        },
                    ),
                )
            )
        return written

    mode = "full" if all(s.plan.mode == "full" for s in parts) else "incremental"
    reason = parts[0].plan.reason if mode == "full" else ""
    changes = {k: sum(s.plan.counts[k] for s in parts) for k in ("unchanged", "changed", "added", "deleted")}
    if previous is not None and all(s.gathered is None for s in parts):
        return _unchanged(previous, out, outcomes, spec, changes, timings, t0)
    build = {
        "mode": mode,
        "reason": reason,
        "files": changes,
        "previous": previous.fingerprint if previous else None,
        "shards_rebuilt": [s.name for s in parts if s.gathered is not None],
    }
    if quantizer is not None:
        build["quantizer"] = quantizer["build"]
    index_section = {
        **spec.to_manifest(),
        "sharding": {"rule": "sha256(path)[:8] mod shards", "shards": n},
        **(index_extra or {}),
    }
    manifest, version = publish_shard_set(
        out,
        write_shards,
        embedding=embedding,
        chunking=chunking,
        index=index_section,
        counts=_counts(outcomes, sum(o.documents for o in outcomes), total),
        extra={"skipped": _skipped(outcomes), "build": build, "corpus_encoding": encoding},
    )
    timings["index"] = time.perf_counter() - t
    shard_info = [
        {
            "name": e["name"],
            "chunks": e["chunks"],
            "fingerprint": e["fingerprint"],
            "action": "linked" if parts[i].linked else "rebuilt",
        }
        for i, e in enumerate(manifest["shards"])
    ]
    index_bytes = sum((version / e["name"] / INDEX_FILE).stat().st_size for e in manifest["shards"])
    timings["total"] = time.perf_counter() - t0
    return BuildReport(
        out=out,
        files=outcomes,
        chunks=total,
        documents=sum(o.documents for o in outcomes),
        dim=dim,
        index_type=spec.index_type,
        index_bytes=index_bytes,
        fp32_bytes=total * dim * 4,
        fingerprint=manifest["fingerprint"],
        seconds={k: round(v, 3) for k, v in timings.items()},
        index_params=spec.params,
        index_reason=spec.reason,
        mode=mode,
        reason=reason,
        changes=changes,
        embedded=sum(len(s.gathered.new_ids) for s in parts if s.gathered is not None),
        quantizer=quantizer["build"] if quantizer is not None else None,
        version=version,
        shards=shard_info,
    )


def _embed_shards(
    parts: list[_Shard],
    files: list[Any],
    embedder: Embedder,
    config: RAGConfig,
    progress: ProgressFn | None,
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> None:
    """Every rebuilt shard's vectors. The new chunks of all shards are embedded together in
    the corpus's chunk order, in the slices one index's build uses (``embed_slices``):
    a text's vector depends on the batch it is padded with, so a full sharded build stores
    the very float16 codes of an unsharded one and scores every chunk the same."""
    rank = {f.doc_id: i for i, f in enumerate(files)}
    todo = sorted(
        (
            (rank[s.gathered.chunks[i].doc_id], i, n)
            for n, s in enumerate(parts)
            if s.gathered is not None
            for i in s.gathered.new_ids
        )
    )
    texts = [parts[n].gathered.chunks[i].text for _, i, n in todo]  # type: ignore[union-attr]
    if embed is not None:
        vectors = embed(texts)
    else:
        vectors = embed_texts(embedder, texts, config.embed.batch_size, progress)
    mine: dict[int, list[int]] = {}
    for row, (_, _, n) in enumerate(todo):
        mine.setdefault(n, []).append(row)
    for n, s in enumerate(parts):
        if s.gathered is not None:
            rows = vectors[mine.get(n, [])]
            s.vectors = gathered_vectors(
                s.plan,
                s.gathered,
                open_previous(s.plan),
                embedder,
                config,
                embed=lambda texts, rows=rows: rows,
            )


def _previous_set(out: Path, n: int, full: bool) -> tuple[Manifest | None, str]:
    """The previous version of a sharded index at ``out`` with ``n`` shards, else None and
    why every shard is built in full. A damaged previous set is refused (its error names
    the shard), never silently replaced."""
    if full:
        return None, "--full was given"
    if not out.exists() and not out.is_symlink():
        return None, "no index at this path yet"
    try:
        previous = check_index(out, vectors="none").manifest  # each shard's plan verifies its own files again
    except IndexIntegrityError:
        raise  # a damaged set is left as it is and refused (a ShardError names the shard)
    except IndexError_ as e:
        return None, f"the previous index cannot be reused: {e}"
    if not is_sharded(previous.data):
        return None, "the previous index is not sharded"
    if previous.data["counts"].get("shards") != n:
        return None, f"the shard count changed: {previous.data['counts'].get('shards')} → {n}"
    return previous, ""


def _same_index(previous: Manifest, spec: IndexSpec, config: RAGConfig) -> bool:
    section = previous.data["index"]
    return section.get("type") == spec.index_type and section.get("requested") == requested_build(
        config.index
    )


def _shared_quantizer(
    spec: IndexSpec,
    parts: list[_Shard],
    previous: Manifest | None,
    config: RAGConfig,
    read: dict[str, Any],
    embedder: Embedder,
    rank: dict[str, int],
) -> tuple[IndexSpec, np.ndarray | None, dict[str, Any] | None]:
    """IVF: the one coarse quantizer of every shard, reused from the previous version while
    it fits the corpus, else trained on a seeded sample of every shard's vectors (then
    every shard is rebuilt). Returns the spec, the centroids and what the manifests and
    report say (None for other index types)."""
    if spec.index_type != "ivf-fp16":
        return spec, None, None
    total = sum(len(s.gathered.chunks) if s.gathered else s.previous_chunks for s in parts)
    why = "no previous centroids"
    if previous is not None and previous.data["index"].get("type") == "ivf-fp16":
        reused, why = reuse_ivf_quantizer(previous.data["index"], spec, total, config.index)
        if reused is not None:
            first = previous.folder / shard_name(0)
            centroids = FaissIndex.load(first, IndexSpec.from_manifest(previous.data["index"])).centroids()
            assert centroids is not None
            trained = float(previous.data["index"]["quantizer"]["fit"])
            fresh = [s.vectors for s in parts if s.vectors is not None]
            now = quantizer_fit(centroids, np.concatenate(fresh)) if fresh else trained
            why = drift(trained, now)
            if not why:
                return (
                    reused,
                    centroids,
                    {
                        "record": {"fit": trained, "sha256": centroids_sha256(centroids)},
                        "build": {
                            "action": "reused",
                            "fit": trained,
                            "fit_now": now,
                            "reason": f"mean cosine of the rebuilt shards to the nearest centroid {now:.3f} "
                            f"(at training {trained:.3f})",
                        },
                    },
                )
    for s in parts:  # every list changes: every shard is rebuilt, its vectors read back
        if s.vectors is None:
            s.gathered = gather(s.plan, **read)
            s.vectors = gathered_vectors(s.plan, s.gathered, open_previous(s.plan), embedder, config)
    # In the corpus's chunk order, sampled as one index samples: over the same corpus the
    # centroids are the very ones an unsharded IVF build trains.
    order = sorted(
        (rank[c.doc_id], i, n) for n, s in enumerate(parts) for i, c in enumerate(s.gathered.chunks)
    )  # type: ignore[union-attr]
    rows = ivf_sample_rows(len(order), spec.train_size)
    sample = np.stack([parts[order[r][2]].vectors[order[r][1]] for r in rows])  # type: ignore[index]
    centroids = FaissIndex.build(sample, spec).centroids()  # k-means on the sample, as one index trains
    assert centroids is not None
    fit = quantizer_fit(centroids, np.concatenate([s.vectors for s in parts]))  # type: ignore[misc]
    return (
        spec,
        centroids,
        {
            "record": {"fit": fit, "sha256": centroids_sha256(centroids)},
            "build": {
                "action": "trained",
                "fit": fit,
                "reason": f"{why}; trained once on {len(sample)} vectors sampled from "
                f"all {len(parts)} shards",
            },
        },
    )


def _outcomes(parts: list[_Shard]) -> list[FileOutcome]:
    """Every file's outcome, in the corpus's file order (unchanged shards: from their
    previous records)."""
    by_doc: dict[str, FileOutcome] = {}
    for s in parts:
        if s.gathered is not None:
            by_doc.update((o.path, o) for o in s.gathered.outcomes)
            continue
        for f in s.plan.files:
            r = s.plan.records.get(f.doc_id)
            if r is not None:
                by_doc[f.doc_id] = FileOutcome(
                    f.doc_id,
                    r["status"],
                    r.get("reason", ""),
                    r.get("encoding"),
                    r.get("documents", 0),
                    r.get("chunks", 0),
                )
        skipped = (
            {x["path"]: x["reason"] for x in s.plan.previous.data.get("skipped", [])}
            if s.plan.previous
            else {}
        )
        for f in s.plan.files:
            if f.doc_id not in by_doc and f.doc_id in skipped:
                by_doc[f.doc_id] = FileOutcome(f.doc_id, "skipped", skipped[f.doc_id])
    order = [f.doc_id for s in sorted(parts, key=lambda p: p.number) for f in s.plan.files]
    return [by_doc[d] for d in sorted(order) if d in by_doc]


def _counts(outcomes: list[FileOutcome], documents: int, chunks: int) -> dict[str, int]:
    return {
        "files_read": sum(o.status == "ok" for o in outcomes),
        "files_skipped": sum(o.status == "skipped" for o in outcomes),
        "documents": documents,
        "chunks": chunks,
    }


def _skipped(outcomes: list[FileOutcome]) -> list[dict[str, str]]:
    return [{"path": o.path, "reason": o.reason} for o in outcomes if o.status == "skipped"]


def _build_record(plan: BuildPlan, g: Gathered) -> dict[str, Any]:
    return {
        "mode": plan.mode,
        "reason": plan.reason,
        "files": plan.counts,
        "chunks_embedded": len(g.new_ids),
        "chunks_kept": len(g.chunks) - len(g.new_ids),
        "previous": plan.previous.fingerprint if plan.previous is not None else None,
    }


def _unchanged(
    previous: Manifest,
    out: Path,
    outcomes: list[FileOutcome],
    spec: IndexSpec,
    changes: dict[str, int],
    timings: dict[str, float],
    t0: float,
) -> BuildReport:
    """No shard changed and the index would be built the same way: no new version."""
    data = previous.data
    timings["total"] = time.perf_counter() - t0
    return BuildReport(
        out=out,
        files=outcomes,
        chunks=data["counts"]["chunks"],
        documents=data["counts"]["documents"],
        dim=int(data["embedding"]["dim"]),
        index_type=spec.index_type,
        index_bytes=sum((previous.folder / e["name"] / INDEX_FILE).stat().st_size for e in data["shards"]),
        fp32_bytes=data["counts"]["chunks"] * int(data["embedding"]["dim"]) * 4,
        fingerprint=previous.fingerprint,
        seconds={k: round(v, 3) for k, v in timings.items()},
        index_params=spec.params,
        index_reason=spec.reason,
        mode="up to date",
        changes=changes,
        version=previous.folder,
        shards=[{**e, "action": "unchanged"} for e in data["shards"]],
    )
