"""``build_index_ray``: the index ``build_index`` writes, read, chunked and embedded on a
Ray cluster (``ragserve build-index --ray``).

- Files are read and chunked in Ray tasks, a run of files per task, by ragserve's own
  reader and chunker (``incremental.read_source``) with the embedding model's tokenizer
  (put in the object store once). ``assemble`` then numbers the chunks in the plan's
  order, so the chunk ids are a local build's whatever order the tasks finish in.
- New chunks are embedded by a pool of actors (Ray's ``ActorPool``), each holding
  ragserve's own ``SentenceTransformerEmbedder``, one ``embed_slices`` slice per call. A
  text's vector depends on the texts padded with it, so the slices are the local build's:
  the vectors, the float16 index file and the fingerprint come out the same as a local
  build's on the same kind of CPU.
- The vectors come back to the driver, which builds the FAISS index and publishes the
  folder with ``finish_build``, as a local build does.

Incremental builds work as locally: unchanged files keep their chunks and vectors from the
previous index (read on the driver); only new and changed files go to the cluster.

NOTE: Ray Data (``map_batches`` with an actor class) is the usual tool for this, but it
needs ``ray[data]`` (pyarrow), which the ``ragserve[ray]`` extra (``ray[serve]``) does not
install. Ray core's tasks and ``ActorPool`` do the same job here without it, and keep the
local build's embedding slices exactly.

On more than one machine: install ragserve and its embedding model on every node (each
actor checks the model's identity against the driver's), and make the source folder
readable at the same path on every node (a shared file system): tasks read files where
they run.

**Usage:** ``build_index_ray("docs/", "indexes/docs", address="auto", actors=8)``
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from ragserve.build import BuildReport, PlannedBuild, ProgressFn, embed_slices, finish_build, start_build
from ragserve.cluster import ClusterInfo, import_ray, probe, ray_session
from ragserve.config import EmbedConfig, RAGConfig
from ragserve.errors import ClusterError, ModelError, RagserveError
from ragserve.incremental import FileRead, Gathered, SourceFile, assemble, files_to_read, read_source
from ragserve.ingest import Chunker
from ragserve.types import Embedder

__all__ = ["ChunkEmbedder", "build_index_ray", "read_files"]

TASKS_PER_CPU = 4
"""Read tasks per CPU of the cluster: enough that one slow file does not hold the others."""
ACTOR_START_TIMEOUT_S = 300.0


def build_index_ray(
    source: Path | str,
    out: Path | str,
    config: RAGConfig | None = None,
    *,
    address: str | None = None,
    actors: int | None = None,
    embedder: Embedder | None = None,
    encoding: str | None = None,
    progress: ProgressFn | None = None,
    full: bool = False,
    num_cpus: int | None = None,
) -> BuildReport:
    """``build_index`` with reading and chunking in Ray tasks and embedding in ``actors``
    Ray actors (default: one per CPU of the cluster, ``embed.threads`` CPUs each).

    ``address`` is as for ``cluster.ray_session`` (default: this process's connection, else
    a running cluster, else a local one started for this build); ``num_cpus`` sizes a
    local cluster started here. ``report.cluster`` says what ran where, and
    ``report.seconds`` holds ``ray_start`` and ``actors`` (Ray's own start-up) apart.
    """
    ray = import_ray()  # a missing ray or a bad address fails before any work
    if address not in (None, "auto", "local"):
        probe(address)
    if actors is not None and actors < 1:
        raise ClusterError(f"--ray-actors must be >= 1, got {actors}")
    build = start_build(source, out, config, embedder=embedder, encoding=encoding, progress=progress,
                        full=full)
    with ray_session(address, num_cpus=num_cpus) as info:
        build.timings["ray_start"] = info.seconds
        try:
            t = time.perf_counter()
            files = files_to_read(build.plan)
            g, tasks = _read_on_ray(ray, build, files, info, progress)
            build.timings["read"] = time.perf_counter() - t
            pool = _EmbedPool(ray, build, actors or max(1, int(info.cpus // _cpus_per_actor(build))),
                              progress)
            report = finish_build(build, g, progress=progress, embed=pool.embed)
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None
    report.cluster = {"address": info.address, "how": info.how, "nodes": info.nodes, "cpus": info.cpus,
                      "read_tasks": tasks, "files_read": len(files), **pool.summary()}
    if "actors" in build.timings:
        report.seconds["actors"] = round(build.timings["actors"], 3)
    return report


def read_files(files: list[SourceFile], tokenizer: Any, options: dict[str, Any]) -> list[FileRead]:
    """A Ray task: read and chunk a run of files exactly as ``gather`` does locally
    (``options`` are ``PlannedBuild.read_options()`` without the tokenizer)."""
    chunker = Chunker(options["chunk_size"], options["chunk_overlap"], tokenizer)
    return [read_source(f, chunker, options["encoding"], options["max_bytes"]) for f in files]


def _read_on_ray(ray: Any, build: PlannedBuild, files: list[SourceFile], info: ClusterInfo,
                 progress: ProgressFn | None) -> tuple[Gathered, int]:
    if not files:  # an incremental build where nothing changed: nothing to send
        return assemble(build.plan, []), 0
    options = build.read_options()
    tokenizer = ray.put(options.pop("tokenizer"))
    task = ray.remote(read_files)
    pending = [task.remote(run, tokenizer, options)
               for run in _file_runs(files, max(1, int(info.cpus * TASKS_PER_CPU)))]
    tasks, reads = len(pending), []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        reads.extend(ray.get(done[0]))
        if progress:
            progress("read", len(reads), len(files))
    return assemble(build.plan, reads), tasks


def _file_runs(files: list[SourceFile], n: int) -> list[list[SourceFile]]:
    """``files`` cut into at most ``n`` consecutive runs of about equal bytes."""
    total = sum(max(f.bytes, 1) for f in files)
    runs: list[list[SourceFile]] = [[]]
    size = 0
    for f in files:
        if size >= total / n and len(runs) < n:
            runs.append([])
            size = 0
        runs[-1].append(f)
        size += max(f.bytes, 1)
    return runs


class ChunkEmbedder:
    """A Ray actor holding ragserve's own embedder: loaded once by ``ready()``, then one
    slice of chunk texts per ``embed`` call.

    **Usage:** ``a = ray.remote(ChunkEmbedder).remote(config, identity, 0); ray.get(a.ready.remote())``
    """

    def __init__(self, config: EmbedConfig, identity: dict[str, Any], index: int) -> None:
        self.config, self.identity, self.index = config, identity, index
        self.embedder: Any = None

    def ready(self) -> dict[str, Any]:
        """Load the model (checking it is the driver's); where and how fast."""
        from ragserve.embed import SentenceTransformerEmbedder

        t = time.perf_counter()
        embedder = SentenceTransformerEmbedder(self.config)
        if embedder.identity.get("identity") != self.identity.get("identity"):
            raise ModelError(f"the embedding model on node {socket.gethostname()} ({embedder.path}, "
                             f"{str(embedder.identity.get('identity'))[:12]}) is not the driver's "
                             f"({self.identity.get('name')}, {str(self.identity.get('identity'))[:12]}): "
                             "install the same model on every node", stage="embed")
        embedder.warm_up()
        self.embedder = embedder
        return {"actor": self.index, "node": socket.gethostname(), "pid": os.getpid(),
                "load_s": round(time.perf_counter() - t, 3), "precision": embedder.precision}

    def embed(self, start: int, texts: list[str], batch_size: int) -> tuple[int, np.ndarray, float, int]:
        """``(start, vectors, seconds spent encoding, actor index)`` for one slice."""
        t = time.perf_counter()
        vectors = self.embedder.encode(texts, batch_size=batch_size)
        return start, vectors, time.perf_counter() - t, self.index


class _EmbedPool:
    """``finish_build``'s ``embed``: the actors start on the first call (a build with
    nothing new to embed starts none) and are killed when it returns."""

    def __init__(self, ray: Any, build: PlannedBuild, actors: int, progress: ProgressFn | None) -> None:
        self.ray, self.build, self.actors, self.progress = ray, build, actors, progress
        # NOTE: the driver resolves "auto" precision: a node without native bf16 must still
        # compute what the manifest records.
        config = getattr(build.embedder, "config", build.config.embed)
        precision = getattr(build.embedder, "precision", config.precision)
        self.config = dataclasses.replace(config, precision=precision)
        self.cpus = _cpus_per_actor(build)
        self.started: list[dict[str, Any]] = []
        self.work: dict[int, list[float]] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        ray, batch = self.ray, self.build.config.embed.batch_size
        slices = embed_slices(len(texts), batch)
        out = np.empty((len(texts), self.build.embedder.dim), np.float32)
        if not slices:
            return out
        n = min(self.actors, len(slices))
        cls = ray.remote(ChunkEmbedder).options(num_cpus=self.cpus)
        handles = [cls.remote(self.config, self.build.embedder.identity, i) for i in range(n)]
        try:
            t = time.perf_counter()
            self.started = self._ready(handles)
            self.build.timings["actors"] = time.perf_counter() - t
            done = 0
            pool = ray.util.ActorPool(handles)
            for start, vectors, seconds, index in pool.map_unordered(
                    lambda a, s: a.embed.remote(s[0], texts[s[0]:s[1]], batch), slices):
                out[start:start + len(vectors)] = vectors
                work = self.work.setdefault(index, [0, 0.0])
                work[0] += len(vectors)
                work[1] += seconds
                done += len(vectors)
                if self.progress:
                    self.progress("embed", done, len(texts))
        finally:
            for h in handles:
                ray.kill(h)
        return out

    def _ready(self, handles: list[Any]) -> list[dict[str, Any]]:
        try:
            return self.ray.get([h.ready.remote() for h in handles], timeout=ACTOR_START_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            free = self.ray.available_resources().get("CPU", 0)
            raise ClusterError(f"{len(handles)} embedding actors ({self.cpus} CPU each) did not start within "
                               f"{ACTOR_START_TIMEOUT_S:g} s; the cluster has {free:g} CPUs free: lower "
                               "--ray-actors") from None

    def summary(self) -> dict[str, Any]:
        """Per actor: node, model load time, chunks embedded and the encoding rate."""
        per_actor = []
        for s in self.started:
            chunks, seconds = self.work.get(s["actor"], [0, 0.0])
            per_actor.append({**s, "chunks": int(chunks), "seconds": round(seconds, 3),
                              "chunks_per_s": round(chunks / seconds, 1) if seconds else 0.0})
        return {"actors": len(self.started), "cpus_per_actor": self.cpus, "per_actor": per_actor}


def _cpus_per_actor(build: PlannedBuild) -> int:
    """CPUs an embedding actor reserves: its torch threads (``embed.threads``), at least 1."""
    return max(1, build.config.embed.threads)


def _cause(e: Exception) -> BaseException:
    """The error a task or actor raised, when it is one of ragserve's (it names the stage
    and the file or model); else Ray's error, which carries the remote traceback."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, RagserveError) else e
