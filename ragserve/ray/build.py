"""``build_index_ray``: the index ``build_index`` writes, read, chunked and embedded on a
Ray cluster (``ragserve build-index --ray``).

- Files are read and chunked in Ray tasks, a run of files per task, by ragserve's own
  reader and chunker (``incremental.read_source``) with the embedding model's tokenizer
  (put in the object store once). ``assemble`` then numbers the chunks in the plan's
  order, so the chunk ids are a local build's whatever order the tasks finish in.
- New chunks are embedded with Ray Data: a dataset of the local build's ``embed_slices``
  slices (one row each: its start and its texts) mapped by ``map_batches`` with a class
  (``ChunkEmbedder``) on a fixed pool of actors, each holding ragserve's own
  ``SentenceTransformerEmbedder``, one slice per call (``batch_size=1``). A text's vector
  depends on the texts padded with it, so the slices are the local build's: the vectors,
  the float16 index file and the fingerprint come out the same as a local build's on the
  same kind of CPU. Each output row also says which actor embedded it and how long that
  took, from which ``report.cluster`` gives each actor's share and rate.
- The vectors stream back to the driver, which builds the FAISS index and publishes the
  folder with ``finish_build``, as a local build does.

Incremental builds work as locally: unchanged files keep their chunks and vectors from the
previous index (read on the driver); only new and changed files go to the cluster.

A sharded index (``build_sharded_ray``, ``build-index --shards N --ray``) embeds with the same
pool and slices, and reads, chunks, links unchanged shards and writes on the driver, as
``build/sharded.py`` does locally.

On more than one machine: install ragserve and its embedding model on every node (each
actor checks the model's identity against the driver's), and make the source folder
readable at the same path on every node (a shared file system): tasks read files where
they run.

**Usage:** ``build_index_ray("docs/", "indexes/docs", address="auto", actors=8)``
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ragserve.build.builder import (
    BuildReport,
    PlannedBuild,
    ProgressFn,
    embed_slices,
    finish_build,
    ready_embedder,
    start_build,
)
from ragserve.build.incremental import FileRead, Gathered, SourceFile, assemble, files_to_read, read_source
from ragserve.build.ingest import Chunker, iter_files
from ragserve.build.textfile import check_encoding
from ragserve.config import EmbedConfig, RAGConfig
from ragserve.errors import ClusterError, ModelError, RagserveError
from ragserve.ray.cluster import ClusterInfo, cluster_target, import_ray, probe, quiet_ray_data, ray_session
from ragserve.types import Embedder

__all__ = ["ChunkEmbedder", "build_index_ray", "build_sharded_ray", "read_files"]

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

    ``address`` is as for ``cluster.ray_session`` (default: ``ray.address``, else this
    process's connection, a running cluster or a local one started for this build);
    ``num_cpus`` sizes a local cluster started here (default: ``ray.local_num_cpus``).
    ``report.cluster`` says what ran where, and ``report.seconds`` holds ``ray_start`` and
    ``actors`` (Ray's own start-up: Ray Data starting the actors, each loading its model,
    before the first slice) apart.
    """
    ray = import_ray()  # a missing ray or a bad address fails before any work
    config = config or RAGConfig.load()
    address, num_cpus = _checked_target(config, address, num_cpus, actors)
    build = start_build(source, out, config, embedder=embedder, encoding=encoding, progress=progress,
                        full=full)
    with ray_session(address, num_cpus=num_cpus) as info:
        build.timings["ray_start"] = info.seconds
        try:
            t = time.perf_counter()
            files = files_to_read(build.plan)
            g, tasks = _read_on_ray(ray, build, files, info, progress)
            build.timings["read"] = time.perf_counter() - t
            pool = _EmbedPool(ray, build.config, build.embedder, build.timings,
                              actors or max(1, int(info.cpus // _cpus_per_actor(build.config))), progress)
            report = finish_build(build, g, progress=progress, embed=pool.embed)
        except ray.exceptions.RayError as e:
            raise _cause(e) from None
    _report_cluster(report, info, pool, build.timings, read_tasks=tasks, files_read=len(files))
    return report


def build_sharded_ray(
    source: Path | str,
    out: Path | str,
    config: RAGConfig | None = None,
    *,
    shards: int | None = None,
    address: str | None = None,
    actors: int | None = None,
    embedder: Embedder | None = None,
    encoding: str | None = None,
    progress: ProgressFn | None = None,
    full: bool = False,
    num_cpus: int | None = None,
) -> BuildReport:
    """``build_sharded`` (``build-index --shards N --ray``) with the new chunks of every
    rebuilt shard embedded by ``actors`` Ray actors: the pool and the slices of
    ``build_index_ray``, so the shard set is the one a local sharded build writes (the
    shards' chunks, float16 codes and fingerprints, and the top fingerprint). Incremental as
    locally: only the shards whose files changed are read, embedded and written, the others
    linked. Reading and chunking stay in this process (a sharded build plans, reads and
    links shard by shard on the driver), so the source need be on this machine only.
    ``address``, ``actors`` and ``num_cpus`` are ``build_index_ray``'s.

    **Usage:** ``build_sharded_ray("docs/", "indexes/docs", shards=4, address="auto")``
    """
    from ragserve.build.sharded import build_sharded, shard_count

    ray = import_ray()
    config = config or RAGConfig.load()
    address, num_cpus = _checked_target(config, address, num_cpus, actors)
    shards = shard_count(config, shards)  # bad input fails before the model loads and the cluster starts
    iter_files(Path(source))
    check_encoding(encoding)
    embedder, _ = ready_embedder(config, embedder)  # the actors compute the precision it resolved
    timings: dict[str, float] = {}
    with ray_session(address, num_cpus=num_cpus) as info:
        try:
            pool = _EmbedPool(ray, config, embedder, timings,
                              actors or max(1, int(info.cpus // _cpus_per_actor(config))), progress)
            report = build_sharded(source, out, config, shards=shards, embedder=embedder, encoding=encoding,
                                   progress=progress, full=full, embed=pool.embed)
        except ray.exceptions.RayError as e:
            raise _cause(e) from None
    _report_cluster(report, info, pool, timings)
    report.seconds["ray_start"] = round(info.seconds, 3)
    return report


def _checked_target(config: RAGConfig, address: str | None, num_cpus: int | None,
                    actors: int | None) -> tuple[str | None, int | None]:
    """``cluster_target``, with an explicit address probed and ``actors`` checked: bad
    input fails before any work."""
    address, num_cpus = cluster_target(address, num_cpus, config.ray)
    if address not in (None, "auto", "local"):
        probe(address)
    if actors is not None and actors < 1:
        raise ClusterError(f"--ray-actors must be >= 1, got {actors}")
    return address, num_cpus


def _report_cluster(report: BuildReport, info: ClusterInfo, pool: _EmbedPool, timings: dict[str, float],
                    **extra: Any) -> None:
    """What ran where (``report.cluster``) and the actors' start-up (``seconds.actors``)."""
    report.cluster = {"address": info.address, "how": info.how, "nodes": info.nodes, "cpus": info.cpus,
                      **extra, **pool.summary()}
    if "actors" in timings:
        report.seconds["actors"] = round(timings["actors"], 3)


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
    """Ray Data's callable class for ``map_batches``: ragserve's own embedder, loaded and
    checked against the driver's model once per actor, then one slice per call
    (``batch_size=1``). A row in is ``start`` and ``texts``; a row out is ``start``, the
    vectors as raw float32 bytes, the seconds spent encoding and ``actor`` (JSON: Ray's
    actor id, node, pid, model load seconds, precision), so the driver can tell each
    actor's share from the rows alone.

    NOTE: the model loads in ``__init__``, not in a ``warm_up()``: Ray Data builds the
    class once per actor and waits for every actor's ``__init__`` before it sends work.

    **Usage:** ``ds.map_batches(ChunkEmbedder, fn_constructor_kwargs={"config": c,
    "identity": i, "batch_size": 32}, compute=ray.data.ActorPoolStrategy(size=2), batch_size=1)``
    """

    def __init__(self, config: EmbedConfig, identity: dict[str, Any], batch_size: int) -> None:
        from ragserve.retrieval.embed import SentenceTransformerEmbedder

        t = time.perf_counter()
        embedder = SentenceTransformerEmbedder(config)
        if embedder.identity.get("identity") != identity.get("identity"):
            raise ModelError(f"the embedding model on node {socket.gethostname()} ({embedder.path}, "
                             f"{str(embedder.identity.get('identity'))[:12]}) is not the driver's "
                             f"({identity.get('name')}, {str(identity.get('identity'))[:12]}): "
                             "install the same model on every node", stage="embed")
        embedder.warm_up()
        self.embedder, self.batch_size = embedder, batch_size
        self.actor = json.dumps({"id": _actor_id(), "node": socket.gethostname(), "pid": os.getpid(),
                                 "load_s": round(time.perf_counter() - t, 3),
                                 "precision": embedder.precision})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (start,), (texts,) = batch["start"], batch["texts"]
        t = time.perf_counter()
        vectors = self.embedder.encode([str(text) for text in texts], batch_size=self.batch_size)
        # NOTE: an object array: a numpy bytes array ("S") would drop the payload's trailing zero bytes.
        payload = np.array([np.ascontiguousarray(vectors, np.float32).tobytes()], dtype=object)
        return {"start": np.array([start]), "vectors": payload,
                "seconds": np.array([time.perf_counter() - t]), "actor": np.array([self.actor])}


class _EmbedPool:
    """``finish_build``'s (and ``build_sharded``'s) ``embed``: a Ray Data dataset of the local
    build's slices, mapped by ``actors`` ``ChunkEmbedder`` actors. Ray Data starts the actors on
    the first call (a build with nothing new to embed starts none) and stops them when the
    dataset is done."""

    def __init__(self, ray: Any, config: RAGConfig, embedder: Embedder, timings: dict[str, float],
                 actors: int, progress: ProgressFn | None) -> None:
        self.ray, self.embedder, self.actors, self.progress = ray, embedder, actors, progress
        self.timings = timings  # the build's: "actors" is Ray Data's start-up before the first slice
        self.batch_size = config.embed.batch_size
        # NOTE: the driver resolves "auto" precision: a node without native bf16 must still
        # compute what the manifest records.
        embed_config = getattr(embedder, "config", config.embed)
        precision = getattr(embedder, "precision", embed_config.precision)
        self.config = dataclasses.replace(embed_config, precision=precision)
        self.cpus = _cpus_per_actor(config)
        self.started = 0
        self.work: dict[str, dict[str, Any]] = {}  # by Ray actor id, in the order they answered

    def embed(self, texts: list[str]) -> np.ndarray:
        batch = self.batch_size
        slices = embed_slices(len(texts), batch)
        out = np.empty((len(texts), self.embedder.dim), np.float32)
        if not slices:
            return out
        n, failure = min(self.actors, len(slices)), None
        t = time.perf_counter()
        with quiet_ray_data(ACTOR_START_TIMEOUT_S) as ray_data:
            # One slice per block, so that each slice is a task of its own that any actor can take.
            ds = ray_data.from_items([{"start": s, "texts": texts[s:e]} for s, e in slices],
                                     override_num_blocks=len(slices))
            with warnings.catch_warnings():
                # NOTE: max_restarts=0 keeps ActorPool's behaviour (an actor that dies fails the
                # build: no endless retries of a slice that kills it) and spares Ray core's
                # warning about restartable actors. It goes through **ray_remote_args, which
                # Ray 2.60 deprecates (removed in 2.64) with no named parameter to replace it.
                warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
                ds = ds.map_batches(ChunkEmbedder, batch_size=1, batch_format="numpy", num_cpus=self.cpus,
                                    compute=ray_data.ActorPoolStrategy(size=n), max_restarts=0,
                                    fn_constructor_kwargs={"config": self.config, "batch_size": batch,
                                                           "identity": self.embedder.identity})
            self.started = n
            try:
                self._stream(ds, out, t)
            except self.ray.exceptions.GetTimeoutError:
                total = self.ray.cluster_resources().get("CPU", 0)
                failure = ClusterError(f"{n} embedding actors ({self.cpus} CPU each) did not start within "
                                       f"{ACTOR_START_TIMEOUT_S:g} s; the cluster has {total:g} CPUs in all: "
                                       "lower --ray-actors")
            except self.ray.exceptions.RayError as e:
                cause = _cause(e)  # ragserve's own error in an actor (its model refused) first
                failure = cause if isinstance(cause, RagserveError) else _lost_actor(e, self.ray)
                if failure is None:
                    raise
        if failure is not None:
            # NOTE: when an actor fails to start, Ray Data raises from its operator's start and
            # leaves the actors that did start running, held only by the frames of its
            # exception; collecting them (outside the except block, so that nothing keeps
            # them) is what stops those actors and frees their CPUs.
            gc.collect()
            raise failure
        return out

    def _stream(self, ds: Any, out: np.ndarray, t: float) -> None:
        """Put each row's vectors in place as it comes (in any order), with progress."""
        done, dim = 0, out.shape[1]
        rows = iter(ds.iter_rows())
        try:
            for row in rows:
                vectors = np.frombuffer(row["vectors"], np.float32).reshape(-1, dim)
                out[int(row["start"]):int(row["start"]) + len(vectors)] = vectors
                if not self.work:  # Ray Data starts every actor before it sends the first slice
                    self.timings["actors"] = time.perf_counter() - t - float(row["seconds"])
                self._count(row, len(vectors))
                done += len(vectors)
                if self.progress:
                    self.progress("embed", done, len(out))
        finally:
            getattr(rows, "close", lambda: None)()  # stops the actors also when this loop fails

    def _count(self, row: dict[str, Any], chunks: int) -> None:
        actor = json.loads(row["actor"])
        work = self.work.setdefault(actor.pop("id"), {"actor": len(self.work), **actor, "chunks": 0,
                                                      "seconds": 0.0})
        work["chunks"] += chunks
        work["seconds"] += float(row["seconds"])

    def summary(self) -> dict[str, Any]:
        """Per actor that embedded a slice: node, model load time, chunks embedded and the
        encoding rate (an actor that got no slice sends no row, so it is not listed)."""
        per_actor = [{**w, "seconds": round(w["seconds"], 3),
                      "chunks_per_s": round(w["chunks"] / w["seconds"], 1) if w["seconds"] else 0.0}
                     for w in self.work.values()]
        return {"actors": self.started, "cpus_per_actor": self.cpus, "per_actor": per_actor}


def _lost_actor(e: BaseException, ray: Any) -> ClusterError | None:
    """A ClusterError naming the embedding actor that died mid-build (killed, out of memory,
    its node lost), when that is what ``e`` is or wraps; else None. NOTE: the actors have
    ``max_restarts=0`` (see ``_EmbedPool.embed``), so Ray does not retry the slice, and the
    error would otherwise reach the user as Ray's own traceback."""
    x = next((x for x in _wrapped(e) if isinstance(x, ray.exceptions.RayActorError)), None)
    if x is None:
        return None
    text = str(x)
    pid = re.search(r"\bpid: (\d+)", text)
    node = re.search(r"\bip: (\S+)", text)
    where = ", ".join(filter(None, [pid and f"pid {pid.group(1)}", node and f"node {node.group(1)}"]))
    return ClusterError(f"an embedding actor ({where or 'unknown'}) died mid-build, "
                        f"{type(x).__name__}: {_first_line(text)}; nothing was published: the "
                        "previous index is still served. Run the build again")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _actor_id() -> str:
    import ray

    return ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"  # None outside an actor


def _cpus_per_actor(config: RAGConfig) -> int:
    """CPUs an embedding actor reserves: its torch threads (``embed.threads``), at least 1."""
    return max(1, config.embed.threads)


def _cause(e: Exception) -> BaseException:
    """The error a task or actor raised, when it is one of ragserve's (it names the stage
    and the file or model); else Ray's error, which carries the remote traceback. Ray and
    Ray Data wrap it a level or two deep (an actor whose ``__init__`` failed is an
    ActorDiedError around a RayTaskError around it), so the wrappers are searched."""
    return next((x for x in _wrapped(e) if isinstance(x, RagserveError)), e)


def _wrapped(e: BaseException) -> Iterator[BaseException]:
    """``e`` and what it wraps, breadth first: Ray's ``cause``, the chained exceptions, and
    exceptions among its ``args``."""
    todo: list[BaseException] = [e]
    seen: set[int] = set()
    while todo:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [c for c in (getattr(x, "cause", None), x.__cause__, x.__context__, *x.args)
                 if isinstance(c, BaseException)]
