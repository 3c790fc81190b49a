"""What the Ray fan-out over shard actors costs: single-query search over N shard actors
(``serve --ray``'s ``RemoteShardedIndex``, on loopback) against in-process search of one
flat index of the same vectors, in one run, and whether the top-10s are identical.

The index: seeded synthetic unit vectors (384-d, clustered as in bench_scale.py), written
once as one flat-fp16 index folder and once as an N-shard set (the folders ``build-index``
and ``build-index --shards`` write, through the same writer). The shard actors are the
application's own: the ``RagserveShards`` supervisor deployed alone on a local cluster,
which starts the actors, and the fan-out an ingress replica uses (``fanout.shard_opener``).

Each query is searched by every contender back to back (in-process single index, in-process
``ShardedIndex`` of the same shards, the Ray fan-out), so the machine's noise falls on all
of them alike; p50 / p99 are over the queries.

A benchmark, not a test: the machine is shared; compare within one run. The CPU and load
average are at the top of the report.

Usage:
    python benchmarks/bench_ray_shards.py --vectors 200000 --shards 4
    python benchmarks/bench_ray_shards.py --out reports/bench_ray_shards.md \
        --json reports/bench_ray_shards.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import harness
import numpy as np
from bench_scale import unit_vectors
from harness import pcts

from ragserve.config import RAGConfig
from ragserve.retrieval.faiss_index import FaissIndex
from ragserve.types import Chunk

DIM = 384


def write_indexes(root: Path, x: np.ndarray, shards: int) -> tuple[Path, Path]:
    """One flat-fp16 index folder and an ``shards``-shard set of the same vectors, in order."""
    from ragserve.index.shards import shard_name
    from ragserve.index.writer import (
        embedding_section,
        publish_index_folder,
        publish_shard_set,
        write_index_folder,
    )
    from ragserve.models.resolve import model_identity, resolve_embedding_model

    model = resolve_embedding_model("default")
    embedding = embedding_section(model_identity(model), model, DIM)
    chunking = {"splitter": "synthetic", "chunk_size": 0, "chunk_overlap": 0}

    def chunks(first: int, n: int) -> list[Chunk]:
        return [Chunk(i, f"synthetic/{(first + i) // 100}.txt", f"synthetic chunk {first + i}")
                for i in range(n)]

    def counts(n: int) -> dict[str, int]:
        return {"files_read": 0, "files_skipped": 0, "documents": max(1, n // 100), "chunks": n}

    single, sharded = root / "single", root / "sharded"
    flat = FaissIndex.build(x, "flat-fp16")
    publish_index_folder(single, flat, chunks=chunks(0, len(x)), embedding=embedding, chunking=chunking,
                         counts=counts(len(x)), extra={"skipped": []})
    bounds = [int(b) for b in np.linspace(0, len(x), shards + 1)]

    def write_shards(folder: Path) -> list:
        out = []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            (folder / shard_name(i)).mkdir()
            part = FaissIndex.build(x[a:b], "flat-fp16")
            manifest = write_index_folder(folder / shard_name(i), part, chunks=chunks(a, b - a),
                                          embedding=embedding, chunking=chunking, counts=counts(b - a),
                                          extra={"skipped": []})
            out.append((shard_name(i), manifest))
        return out

    publish_shard_set(sharded, write_shards, embedding=embedding, chunking=chunking,
                      index={**flat.spec.to_manifest()}, counts=counts(len(x)), extra={"skipped": []})
    return single, sharded


def same_top(a: list, b: list, tol: float = 1e-6) -> bool:
    return all([h.chunk_id for h in x] == [h.chunk_id for h in y]
               and all(abs(h.score - g.score) <= tol for h, g in zip(x, y, strict=True))
               for x, y in zip(a, b, strict=True))


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--vectors", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    log = harness.logger("bench_ray_shards")
    env = harness.environment("ray", "faiss-cpu", gpu=False)

    import ray
    from ray import serve

    from ragserve.engine.served import open_index
    from ragserve.index.manifest import read_manifest
    from ragserve.ray.serve.app import SHARDS
    from ragserve.ray.serve.fanout import shard_opener
    from ragserve.ray.serve.shards import ShardSupervisor
    from ragserve.testing.fakes import FakeEmbedder

    x = unit_vectors(args.vectors, DIM, seed=7, kind="clustered")
    queries = unit_vectors(args.queries, DIM, seed=99, kind="clustered")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        single_path, sharded_path = write_indexes(Path(tmp), x, args.shards)
        log(f"wrote {args.vectors:,} vectors as one index and {args.shards} shards "
            f"in {time.perf_counter() - t:.1f} s")
        cfg = RAGConfig().replace(ray={"shard_replicas": 1, "shard_num_cpus": 0.25})
        embedder = FakeEmbedder()
        built = read_manifest(single_path).data["embedding"]
        embedder.identity = {"name": built.get("name"), "identity": built.get("identity")}
        embedder.dim = DIM
        _, single, _ = open_index(single_path, cfg, embedder)
        _, local, _ = open_index(sharded_path, cfg, embedder)
        ray.init(include_dashboard=False, log_to_driver=False, num_cpus=4)
        try:
            supervisor = serve.deployment(ShardSupervisor, name=SHARDS, ray_actor_options={"num_cpus": 0})
            handle = serve.run(supervisor.bind(cfg.to_dict()), name="bench-ray-shards", route_prefix=None)
            t = time.perf_counter()
            remote = open_index(sharded_path, cfg, embedder, shard_opener(handle, cfg))[1]
            log(f"{args.shards} shard actors up in {time.perf_counter() - t:.1f} s")
            rows = measure(queries, {"single": single, "in-process sharded": local, "ray fan-out": remote})
            exact = {name: same_top(single.search(queries, 10), index.search(queries, 10))
                     for name, index in (("in-process sharded", local), ("ray fan-out", remote))}
            remote.close()
            serve.delete("bench-ray-shards")
        finally:
            serve.shutdown()
            ray.shutdown()
    base = rows["single"]
    lines = ["# Sharded search over Ray shard actors against one index", "", *harness.run_lines(env), "",
             f"{args.vectors:,} vectors (384-d, flat-fp16), {args.shards} shards, "
             f"{args.queries} single queries, "
             "top-10; each query searched by every row back to back. Ray: a local cluster on this machine "
             "(loopback), one copy per shard.", "",
             "| search | p50 ms | p99 ms | p50 over one index | p99 over one index | top-10 vs one index |",
             "|---|---|---|---|---|---|"]
    for name, (p50, p99) in rows.items():
        same = "reference" if name == "single" else ("identical" if exact[name] else "DIFFERENT")
        over = "—" if name == "single" else f"{p50 - base[0]:+.3f}"
        over99 = "—" if name == "single" else f"{p99 - base[1]:+.3f}"
        lines.append(f"| {name} | {p50:.3f} | {p99:.3f} | {over} | {over99} | {same} |")
    harness.write_report("\n".join(lines), md=args.out, json_path=args.json,
                         data={"env": env, "args": vars(args), "p50_p99": rows, "exact": exact})


def measure(queries: np.ndarray, contenders: dict) -> dict[str, tuple[float, float]]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for index in contenders.values():  # warm: pages touched, Ray's workers and leases up
        for q in queries[:20]:
            index.search(q[None, :], 10)
    for q in queries:
        for name, index in contenders.items():
            t = time.perf_counter()
            index.search(q[None, :], 10)
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: pcts(ts, 50, 99) for name, ts in times.items()}


if __name__ == "__main__":
    main()
