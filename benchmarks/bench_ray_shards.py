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

``--exactness`` is a separate mode: no timing, only whether the Ray fan-out returns what
one index returns, on two corpora (one run, one local cluster, the same supervisor):

- XQuAD (``--xquad``, the package's loaders: ``squad_paragraphs`` for the corpus, one file
  per paragraph as the suite's corpus, ``load_dataset`` for every question), built by the
  package's ``build_index`` and ``build_sharded`` with MiniLM;
- ``--vectors`` synthetic chunks (default 20,000 here), written through the index writer.

Flat shards (N = 2 and 4, ``--exactness-shards``) served by shard actors against one flat
index: per question, the top-10 identical (chunks and order, scores within 1e-6), identical
but for the order of chunks whose scores tie within 1e-6, or different. IVF shards on one
shared coarse quantizer (``build_sharded``'s for XQuAD; the single index's centroids for the
synthetic set, as a sharded build shares them) served by shard actors: recall@10 against the
single IVF index at the same nprobe. Chunks are compared by what they hold (document and
text), since a sharded build numbers them shard-major.

A benchmark, not a test: the machine is shared; compare within one run. The CPU and load
average are at the top of the report.

Usage:
    python benchmarks/bench_ray_shards.py --vectors 200000 --shards 4
    python benchmarks/bench_ray_shards.py --exactness --vectors 20000
    python benchmarks/bench_ray_shards.py --out reports/bench_ray_shards.md \
        --json reports/bench_ray_shards.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np
from bench_scale import unit_vectors
from harness import pcts

from ragserve.config import RAGConfig
from ragserve.retrieval.faiss_index import FaissIndex
from ragserve.types import Chunk

DIM = 384


def write_indexes(root: Path, x: np.ndarray, shards: int, spec: Any = "flat-fp16") -> tuple[Path, Path]:
    """One index folder and an ``shards``-shard set of the same vectors, in order (``spec``:
    flat-fp16 by default; IVF shards are built on the single index's centroids and record
    them as their shared quantizer, as ``build_sharded`` does)."""
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
    flat = FaissIndex.build(x, spec)
    centroids = flat.centroids()  # IVF: the quantizer every shard shares; None for flat
    quantizer = None
    if centroids is not None:
        from ragserve.index.shards import centroids_sha256
        from ragserve.retrieval.faiss_index import quantizer_fit

        quantizer = {"quantizer": {"fit": quantizer_fit(centroids, x), "sha256": centroids_sha256(centroids)}}
    publish_index_folder(single, flat, chunks=chunks(0, len(x)), embedding=embedding, chunking=chunking,
                         counts=counts(len(x)), index_extra=quantizer, extra={"skipped": []})
    bounds = [int(b) for b in np.linspace(0, len(x), shards + 1)]

    def write_shards(folder: Path) -> list:
        out = []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            (folder / shard_name(i)).mkdir()
            part = FaissIndex.build(x[a:b], spec, centroids=centroids)
            manifest = write_index_folder(folder / shard_name(i), part, chunks=chunks(a, b - a),
                                          embedding=embedding, chunking=chunking, counts=counts(b - a),
                                          index_extra=quantizer, extra={"skipped": []})
            out.append((shard_name(i), manifest))
        return out

    publish_shard_set(sharded, write_shards, embedding=embedding, chunking=chunking,
                      index={**flat.spec.to_manifest(), **(quantizer or {})}, counts=counts(len(x)),
                      extra={"skipped": []})
    return single, sharded


def same_top(a: list, b: list, tol: float = 1e-6) -> bool:
    return all([h.chunk_id for h in x] == [h.chunk_id for h in y]
               and all(abs(h.score - g.score) <= tol for h, g in zip(x, y, strict=True))
               for x, y in zip(a, b, strict=True))


TIE = 1e-6
"""Scores this close are a tie: their chunks may come back in either order."""


def same_ranking(a: list, b: list, tol: float = TIE) -> str:
    """"identical" (the same keys in the same order, scores within ``tol``), "ties" (the
    same but for the order of keys whose scores tie within ``tol``, and, at the cut-off,
    which of the tied keys made the top-k) or "different". ``a`` and ``b`` are lists of
    (key, score)."""
    if len(a) != len(b) or any(abs(x[1] - y[1]) > tol for x, y in zip(a, b, strict=True)):
        return "different"
    if [x[0] for x in a] == [y[0] for y in b]:
        return "identical"
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and abs(a[j + 1][1] - a[i][1]) <= tol:
            j += 1
        if j + 1 < len(a) and {x[0] for x in a[i:j + 1]} != {y[0] for y in b[i:j + 1]}:
            return "different"
        i = j + 1
    return "ties"


def keyed(hits: list[list], docstore: Any) -> list[list[tuple[Any, float]]]:
    """Each hit as (what the chunk holds: document and text, score): a sharded build numbers
    chunks shard-major, so ids do not compare across an index and its shards."""
    return [[((c.doc_id, c.text), h.score) for h, c in zip(row, docstore.get_many([h.chunk_id for h in row]),
                                                           strict=True)] for row in hits]


def recall(got: list, want: list) -> float:
    found = sum(len({k for k, _ in g} & {k for k, _ in w}) for g, w in zip(got, want, strict=True))
    return found / max(1, sum(len(w) for w in want))


def xquad_sets(root: Path, xquad: Path, counts: list[int], log: Any) -> tuple[Any, dict, np.ndarray]:
    """XQuAD's paragraphs as files (the suite's corpus), built by ``build_index`` and
    ``build_sharded``: one flat and one IVF index, and each as ``counts`` shards (IVF on the
    shared quantizer). Returns the embedder, {(kind, shards): (one index, the shard set)}
    and every question's vector."""
    from ragserve.build.builder import build_index
    from ragserve.build.sharded import build_sharded
    from ragserve.config import EmbedConfig
    from ragserve.eval.datasets import load_dataset, squad_paragraphs
    from ragserve.retrieval.embed import SentenceTransformerEmbedder
    from ragserve.testing.embedders import ReplayEmbedder

    corpus = root / "xquad-corpus"
    corpus.mkdir()
    for p in squad_paragraphs(xquad):
        (corpus / f"{p.title}_{p.position}.txt").write_text(p.context, encoding="utf-8")
    model = SentenceTransformerEmbedder(EmbedConfig())
    model.warm_up()
    embedder = ReplayEmbedder(model)  # every full build of the corpus embeds the same slices: once
    paths: dict = {}
    for kind, cfg in KINDS.items():
        single = root / f"xquad-{kind}-1"
        build_index(corpus, single, cfg, embedder=embedder)
        for n in counts:
            paths[kind, n] = (single, root / f"xquad-{kind}-{n}")
            build_sharded(corpus, paths[kind, n][1], cfg, shards=n, embedder=embedder)
        log(f"XQuAD: {kind} built as one index and as {counts} shards")
    questions = [q.text for q in load_dataset(xquad).questions]
    return embedder, paths, model.encode(questions)


# XQuAD's ~260 chunks: 16 lists, a quarter of them probed (the default nlist of 4·√n would
# leave about four chunks a list). The synthetic set keeps IVF's defaults for its size.
XQUAD_OPEN = RAGConfig().replace(index={"ivf_nlist": 16, "ivf_nprobe": 4})
KINDS = {kind: XQUAD_OPEN.replace(index={"index_type": kind}) for kind in ("flat-fp16", "ivf-fp16")}
"""The XQuAD builds' configs by index type."""
RAY = {"shard_replicas": 1, "shard_num_cpus": 0.25}


def synthetic_sets(root: Path, n: int, counts: list[int]) -> tuple[Any, dict, np.ndarray]:
    """``n`` synthetic chunks written by ``write_indexes``: flat and IVF (its default nlist
    and nprobe for ``n``), {(kind, shards): (one index, the shard set on its centroids)}."""
    from ragserve.config import IndexConfig
    from ragserve.index.manifest import read_manifest
    from ragserve.retrieval.index_spec import plan_index
    from ragserve.testing.fakes import FakeEmbedder

    x = unit_vectors(n, DIM, seed=7, kind="clustered")
    paths: dict = {}
    for kind in KINDS:
        spec = plan_index(n, IndexConfig(index_type=kind)) if kind == "ivf-fp16" else kind
        for c in counts:
            folder = root / f"synthetic-{kind}-{c}"
            folder.mkdir()
            paths[kind, c] = write_indexes(folder, x, c, spec)
    embedder = FakeEmbedder()
    built = read_manifest(paths["flat-fp16", counts[0]][0]).data["embedding"]
    embedder.identity = {"name": built.get("name"), "identity": built.get("identity")}
    embedder.dim = DIM
    return embedder, paths, unit_vectors(400, DIM, seed=99, kind="clustered")


def exactness(args: Any, log: Any, env: dict) -> None:
    """``--exactness``: the Ray fan-out's top-10 against one index's (see the docstring)."""
    import ray
    from ray import serve

    from ragserve.engine.served import open_index
    from ragserve.ray.cluster import start_local
    from ragserve.ray.serve.app import SHARDS
    from ragserve.ray.serve.fanout import shard_opener
    from ragserve.ray.serve.shards import ShardSupervisor

    counts = [int(c) for c in args.exactness_shards.split(",")]
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "synthetic").mkdir()
        sets = {"XQuAD": xquad_sets(root, args.xquad, counts, log),
                f"synthetic {args.vectors:,}": synthetic_sets(root / "synthetic", args.vectors, counts)}
        reaper = start_local(ray, include_dashboard=False, log_to_driver=False, num_cpus=4)
        try:
            for corpus, (embedder, paths, queries) in sets.items():
                # The actors' nprobe is their supervisor's config: one application per corpus.
                cfg = (XQUAD_OPEN if corpus == "XQuAD" else RAGConfig()).replace(ray=RAY)
                supervisor = serve.deployment(ShardSupervisor, name=SHARDS, ray_actor_options={"num_cpus": 0})
                handle = serve.run(supervisor.bind(cfg.to_dict()), name="bench-ray-exact", route_prefix=None)
                for kind in KINDS:
                    for c in counts:
                        single, sharded = paths[kind, c]
                        _, one, one_docs = open_index(single, cfg, embedder)
                        want = keyed(one.search(queries, 10), one_docs)
                        _, remote, docs = open_index(sharded, cfg, embedder, shard_opener(handle, cfg))
                        got = keyed(remote.search(queries, 10), docs)
                        remote.close()
                        verdicts = [same_ranking(g, w) for g, w in zip(got, want, strict=True)]
                        row = {"corpus": corpus, "kind": kind, "shards": c, "queries": len(queries),
                               "nprobe": getattr(one, "nprobe", None), "recall": recall(got, want),
                               **{v: verdicts.count(v) for v in ("identical", "ties", "different")}}
                        results.append(row)
                        log(str(row))
                serve.delete("bench-ray-exact")
        finally:
            serve.shutdown()
            ray.shutdown()
            reaper.done()
    lines = ["# Exactness of sharded search over Ray shard actors", "", *harness.run_lines(env), "",
             "Top-10 of every query through the Ray fan-out (shard actors of `serve --ray` on a local "
             "cluster, loopback, one copy per shard) against one index of the same chunks: identical = "
             f"same chunks, same order, scores within {TIE:g}; ties = the same but for the order of chunks "
             "whose scores tie. IVF: shards on one shared coarse quantizer, against the single IVF index at "
             "the same nprobe.", "",
             "| corpus | index | shards | queries | identical | identical but for ties | different | "
             "recall@10 vs one index |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        kind = r["kind"] + (f" nprobe {r['nprobe']}" if r["kind"] == "ivf-fp16" else "")
        lines.append(f"| {r['corpus']} | {kind} | {r['shards']} | {r['queries']} | {r['identical']} | "
                     f"{r['ties']} | {r['different']} | {r['recall']:.4f} |")
    harness.write_report("\n".join(lines), md=args.out, json_path=args.json,
                         data={"env": env, "args": vars(args), "rows": results})


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--vectors", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--exactness", action="store_true",
                    help="Compare top-10s over Ray with one index's (XQuAD and --vectors); no timing.")
    ap.add_argument("--exactness-shards", default="2,4", help="With --exactness: shard counts.")
    ap.add_argument("--xquad", type=Path, default=harness.XQUAD)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    log = harness.logger("bench_ray_shards")
    env = harness.environment("ray", "faiss-cpu", gpu=False)
    if args.exactness:
        exactness(args, log, env)
        return

    import ray
    from ray import serve

    from ragserve.engine.served import open_index
    from ragserve.index.manifest import read_manifest
    from ragserve.ray.cluster import start_local
    from ragserve.ray.serve.app import SHARDS
    from ragserve.ray.serve.fanout import shard_opener
    from ragserve.ray.serve.shards import ShardSupervisor
    from ragserve.testing.fakes import FakeEmbedder

    x = unit_vectors(args.vectors, DIM, seed=7, kind="clustered")
    queries = unit_vectors(args.queries, DIM, seed=99, kind="clustered")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        single_path, sharded_path = write_indexes(Path(tmp), x, args.shards)  # flat-fp16
        log(f"wrote {args.vectors:,} vectors as one index and {args.shards} shards "
            f"in {time.perf_counter() - t:.1f} s")
        cfg = RAGConfig().replace(ray={"shard_replicas": 1, "shard_num_cpus": 0.25})
        embedder = FakeEmbedder()
        built = read_manifest(single_path).data["embedding"]
        embedder.identity = {"name": built.get("name"), "identity": built.get("identity")}
        embedder.dim = DIM
        _, single, _ = open_index(single_path, cfg, embedder)
        _, local, _ = open_index(sharded_path, cfg, embedder)
        reaper = start_local(ray, include_dashboard=False, log_to_driver=False, num_cpus=4)
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
            reaper.done()
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
