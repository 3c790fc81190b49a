"""Sharded search in process: what the fan-out costs against one index of the same size,
whether flat shards give one index's top-10 exactly, how IVF shards sharing one quantizer
recall the single IVF index, and the bytes per vector the sizing in docs/scale.md uses.

Per corpus size (seeded synthetic unit vectors, 384-d, clustered as in bench_scale.py):

- flat-fp16: one ``FaissIndex`` against a ``ShardedIndex`` of N contiguous shards (the same
  vectors split), single-query latency p50/p99 of each, the difference (the fan-out: the
  thread hand-off and the merge), and whether every top-10 is identical (ids and scores);
- ivf-fp16: one index against N shards built on its centroids (``centroids=``, what a
  sharded build shares), recall@10 of the shards against the single index at the same
  nprobe, and both against exact search;
- bytes per vector of each type, from the saved files; the docstore's bytes per chunk from
  a real index (``--docstore``, default the XQuAD index if present).

A benchmark, not a test: the machine is shared; compare within one run. The CPU and load
average are at the top of the report.

``--scale STEP`` (issue 26's 10M check) writes a large flat-fp16 sharded index of uniform
random unit vectors through the package's own writer, one step per run so that each fits a
10-minute slot, leaving its files in ``--work``: ``shard`` (one shard folder: vectors
generated and added 100k at a time, the docstore of short synthetic texts, its manifest;
``--shard I``), ``publish`` (the top manifest over them, published as one version by
``publish_shard_set``; the shard files are hard-linked), ``measure`` (two fresh processes:
one opens one shard, the other the whole index, as ``open_index`` does without the embedder:
verify, map, sample check; RSS after opening and after searching, single-query latency per
shard and over all shards), ``serve`` (``RAG.from_index`` with the embedder and 200
``retrieve`` calls, as ``bench_scale.py`` measures serving), ``report`` (the table, beside
what docs/scale.md predicts).

Usage:
    python benchmarks/bench_shards.py --sizes 100000,300000 --shards 2,4
    python benchmarks/bench_shards.py --out reports/bench_shards.md --json reports/bench_shards.json
    W="--vectors 10000000 --shards 4 --work /work/scale10m-data"
    for i in 0 1 2 3; do python benchmarks/bench_shards.py --scale shard --shard $i $W; done
    python benchmarks/bench_shards.py --scale publish $W
    python benchmarks/bench_shards.py --scale measure --queries 200 $W
    python benchmarks/bench_shards.py --scale serve $W
    python benchmarks/bench_shards.py --scale report $W --out reports/bench_shards_10m.md
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import orjson
from bench_scale import child, rss_mb, synthetic_chunks, unit_vector_slices, unit_vectors
from harness import pcts

from ragserve.config import IndexConfig
from ragserve.retrieval.faiss_index import INDEX_FILE, FaissIndex
from ragserve.retrieval.index_spec import plan_index
from ragserve.retrieval.sharded import ShardedIndex

DIM = 384
GIB = 2**30
SIZES = (10_000_000, 100_000_000, 1_000_000_000)
"""Corpus sizes of the sizing table."""
MODEL = {"flat-fp16 bytes per vector": 768.0, "docstore bytes per chunk": 669.0,
         "flat ms per 100k (busy 20k run)": 8.80, "flat ms per 100k (idle 1M, bench_scale)": 2.3,
         "fan-out ms": 0.5}
"""The figures of docs/scale.md's model that the ``--scale`` report compares against."""
USABLE_GIB = 16
"""RAM a shard machine of this kind (24 GiB) gives to resident vectors: the rest is the OS,
the page cache for the docstore's hot lines, the embedder and the serving process."""


def latencies(index, queries: np.ndarray, k: int = 10) -> list[float]:
    out = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None, :], k)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def same_top(a: list, b: list) -> bool:
    return all(
        [h.chunk_id for h in x] == [h.chunk_id for h in y] and [h.score for h in x] == [h.score for h in y]
        for x, y in zip(a, b, strict=True)
    )


def recall(got: list, want: list) -> float:
    hits = sum(len({h.chunk_id for h in g} & {h.chunk_id for h in w}) for g, w in zip(got, want, strict=True))
    return hits / max(1, sum(len(w) for w in want))


def index_bytes(index: FaissIndex) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp))
        return (Path(tmp) / INDEX_FILE).stat().st_size


def split(x: np.ndarray, n: int) -> list[np.ndarray]:
    return [
        x[int(a) : int(b)]
        for a, b in zip(np.linspace(0, len(x), n + 1)[:-1], np.linspace(0, len(x), n + 1)[1:], strict=True)
    ]


def docstore_bytes(folder: Path | None) -> tuple[float, str]:
    """Bytes per chunk of a real docstore (lines + offsets) and where it was measured."""
    from ragserve.index.manifest import read_manifest

    if folder is None or not Path(folder).exists():
        return 1200.0, "not measured (no index given): 1,200 B/chunk assumed"
    m = read_manifest(folder)
    folders = [m.folder / s["name"] for s in m.data["shards"]] if "shards" in m.data else [m.folder]
    size = sum((f / name).stat().st_size for f in folders for name in ("chunks.jsonl", "chunks.offsets.npy"))
    return size / m.data["counts"]["chunks"], f"measured on {folder} ({m.data['counts']['chunks']} chunks)"


def run(n: int, shard_counts: list[int], queries: np.ndarray, log) -> dict:
    x = unit_vectors(n, DIM, seed=7, kind="clustered")
    row: dict = {"n": n, "flat": {}, "ivf": {}}
    flat = FaissIndex.build(x, plan_index(n, IndexConfig(index_type="flat-fp16")))
    row["bytes_per_vector"] = {"flat-fp16": index_bytes(flat) / n}
    single = latencies(flat, queries)
    want = flat.search(queries, 10)
    row["flat"]["single"] = pcts(single, 50, 99)
    ivf_spec = plan_index(n, IndexConfig(index_type="ivf-fp16"))
    ivf = FaissIndex.build(x, ivf_spec)
    row["bytes_per_vector"]["ivf-fp16"] = index_bytes(ivf) / n
    ivf_single = ivf.search(queries, 10)
    row["ivf"] = {
        "nlist": ivf_spec.nlist,
        "nprobe": ivf.nprobe,
        "single_vs_exact": recall(ivf_single, want),
        "single": pcts(latencies(ivf, queries), 50, 99),
    }
    for s in shard_counts:
        sharded = ShardedIndex([FaissIndex.build(part, "flat-fp16") for part in split(x, s)])
        times = latencies(sharded, queries)
        row["flat"][s] = {
            "p50_p99": pcts(times, 50, 99),
            "exact": same_top(want, sharded.search(queries, 10)),
        }
        sharded.close()
        shards = ShardedIndex(
            [FaissIndex.build(part, ivf_spec, centroids=ivf.centroids()) for part in split(x, s)]
        )
        got = shards.search(queries, 10)
        row["ivf"][s] = {
            "recall_vs_single": recall(got, ivf_single),
            "recall_vs_exact": recall(got, want),
            "p50_p99": pcts(latencies(shards, queries), 50, 99),
        }
        shards.close()
        log(f"n={n} shards={s}: flat {row['flat'][s]} ivf {row['ivf'][s]}")
    return row


def sizing(
    bytes_per_vector: dict[str, float], doc_bytes: float, ms_per_100k: float, target_ms: float
) -> list[str]:
    """The sizing table: resident vectors per type, shards by memory and by latency, machines."""
    lines = [
        "| chunks | type | vectors (GiB) | docstore on disk (GiB) | shards by memory "
        f"({USABLE_GIB} GiB each) | flat: shards for p50 ≤ {target_ms:g} ms | machines (24 GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    per_shard_latency = int(target_ms / ms_per_100k * 100_000) if ms_per_100k > 0 else 0
    for n in SIZES:
        for kind, b in bytes_per_vector.items():
            vec = n * b / GIB
            by_mem = math.ceil(vec / USABLE_GIB)
            by_lat = math.ceil(n / per_shard_latency) if kind == "flat-fp16" and per_shard_latency else 0
            lat = f"{by_lat:,}" if by_lat else "—"
            lines.append(
                f"| {n:,} | {kind} | {vec:,.0f} | {n * doc_bytes / GIB:,.0f} | {by_mem:,} | {lat} | "
                f"{max(by_mem, by_lat):,} |"
            )
    return lines


# -- --scale: a large sharded index, one step per run ---------------------------------------

def _shard_sizes(n: int, shards: int) -> list[int]:
    return [n // shards + (i < n % shards) for i in range(shards)]


def scale_shard(args: argparse.Namespace, log) -> dict:
    """One shard folder, written by ``write_index_folder`` into ``work/staging/shard-NNN``:
    its vectors are added 100k at a time (never all of them as float32 at once)."""
    import faiss

    from ragserve.index.shards import shard_name
    from ragserve.index.writer import embedding_section, write_index_folder
    from ragserve.models.resolve import model_identity, resolve_embedding_model
    from ragserve.retrieval.index_spec import IndexSpec

    sizes = _shard_sizes(args.vectors, int(args.shards))
    n, first = sizes[args.shard], sum(sizes[: args.shard])
    folder = args.work / "staging" / shard_name(args.shard)
    if folder.exists():
        raise SystemExit(f"{folder} exists: remove it to rebuild this shard")
    model = resolve_embedding_model("default")
    spec = IndexSpec("flat-fp16")
    t0 = time.perf_counter()
    raw = faiss.index_factory(DIM, spec.factory, faiss.METRIC_INNER_PRODUCT)
    for x in unit_vector_slices(n, DIM, seed=1000 + args.shard, kind="random"):
        raw.add(x)
    index = FaissIndex(raw, spec)
    t_vectors = time.perf_counter() - t0
    folder.mkdir(parents=True)
    manifest = write_index_folder(
        folder,
        index,
        chunks=synthetic_chunks(n, seed=2000 + args.shard, first=first),
        embedding=embedding_section(model_identity(model), model, DIM),
        chunking={"splitter": "synthetic", "chunk_size": 0, "chunk_overlap": 0},
        counts={"files_read": 0, "files_skipped": 0, "documents": -(-n // 100), "chunks": n},
        extra={"skipped": [], "source": {"kind": "synthetic:random", "seed": 1000 + args.shard,
                                         "first": first}},
    )
    files = {k: v["bytes"] for k, v in manifest["files"].items()}
    row = {"shard": args.shard, "n": n, "vectors_s": t_vectors, "total_s": time.perf_counter() - t0,
           "files": files, "rss_peak_mb": rss_mb()["VmHWM"]}
    log(f"{folder.name}: {n:,} vectors in {row['total_s']:.1f} s (vectors {t_vectors:.1f} s), {files}")
    return row


def scale_publish(args: argparse.Namespace, log) -> dict:
    """The top manifest over the staged shards, published as one version of ``work/index``
    (``publish_shard_set``; each shard's files hard-linked by ``link_shard``)."""
    from ragserve.index.shards import shard_name
    from ragserve.index.writer import link_shard, publish_shard_set

    staged = [args.work / "staging" / shard_name(i) for i in range(int(args.shards))]
    first = orjson.loads((staged[0] / "manifest.json").read_bytes())
    t = time.perf_counter()
    manifest, version = publish_shard_set(
        args.work / "index",
        lambda folder: [(s.name, link_shard(s, folder / s.name)) for s in staged],
        embedding=first["embedding"],
        chunking=first["chunking"],
        index={k: v for k, v in first["index"].items() if k != "ntotal"}
        | {"sharding": {"rule": "contiguous synthetic ids", "shards": len(staged)}},
        counts={"files_read": 0, "files_skipped": 0, "documents": -(-args.vectors // 100)},
        extra={"skipped": [], "source": {"kind": "synthetic:random"}},
    )
    row = {"publish_s": time.perf_counter() - t, "version": str(version),
           "ntotal": manifest["index"]["ntotal"]}
    log(f"published {row}")
    return row


def child_scale(path: str, which: str, queries: str) -> dict:
    """A fresh process: open one shard (``which`` = its number) or the whole index (``all``)
    as ``open_index`` does (every file hashed, structure and contents checked, each shard
    mapped and its sample of vectors checked, docstores opened; no embedder), then search
    single queries (top-10) on each shard and, for ``all``, over the sharded index."""
    import faiss  # noqa: F401 - imported before the baseline so the library is not counted as growth

    from ragserve.engine.served import open_shard
    from ragserve.index.manifest import read_manifest
    from ragserve.index.shards import shard_entries
    from ragserve.index.verify import check_index, check_one_shard
    from ragserve.retrieval.docstore import LazyDocStore
    from ragserve.retrieval.sharded import ShardedDocStore, ShardedIndex

    q = np.load(queries)
    load = {"nprobe": 0, "ef_search": 0}
    before = rss_mb()
    t = time.perf_counter()
    top = read_manifest(path)
    entries = shard_entries(top)
    if which == "all":
        shards = [v.manifest for v in check_index(path, vectors="none").shards]
    else:
        entries = [entries[int(which)]]
        shards = [check_one_shard(top, entries[0], "none").manifest]
    t_verify = time.perf_counter() - t
    t = time.perf_counter()
    indexes = [open_shard(top, e, m, load) for e, m in zip(entries, shards, strict=True)]
    sharded = ShardedIndex(indexes)
    docstore = ShardedDocStore([LazyDocStore(m.folder) for m in shards])
    t_map = time.perf_counter() - t
    opened = rss_mb()
    t = time.perf_counter()
    for x in q[:3]:  # pages every vector in once (the page cache has them after the hashing)
        sharded.search(x[None, :], 10)
    t_first = time.perf_counter() - t
    out = {"which": which, "verify_s": t_verify, "map_s": t_map, "first_queries_s": t_first,
           "rss_before": before, "rss_opened": opened, "per_shard": {}}
    for e, index in zip(entries, indexes, strict=True):
        out["per_shard"][e.name] = pcts(latencies(index, q), 50, 99)
    if which == "all":
        out["sharded"] = pcts(latencies(sharded, q), 50, 99)
        hits = sharded.search(q[:1], 10)[0]
        out["top1_text"] = docstore.get(hits[0].chunk_id).text
    out["rss_searched"] = rss_mb()
    sharded.close()
    return out


def scale_measure(args: argparse.Namespace, log) -> dict:
    queries = args.work / "queries.npy"
    np.save(queries, unit_vectors(args.queries, DIM, seed=99, kind="random"))
    index = str(args.work / "index")
    row: dict = {"queries": args.queries}
    for which in ("0", "all"):
        row[which] = child("scale", index, which, str(queries), script=__file__)
        log(f"opened {which}: {row[which]}")
    return row


def scale_serve(args: argparse.Namespace, log) -> dict:
    """``RAG.from_index`` on the sharded index in a fresh process, with the embedder, and 200
    ``retrieve`` calls (``bench_scale.py``'s serving measurement, unchanged)."""
    import bench_scale

    row = child("serve", str(args.work / "index"), "16", script=bench_scale.__file__)
    log(f"served: {row}")
    return row


def scale_report(args: argparse.Namespace, steps: dict) -> str:
    n, shards = args.vectors, int(args.shards)
    builds = [steps[f"shard-{i}"] for i in range(shards)]
    measured = steps["measure"]
    per = n / shards
    mb = 2**20
    pred_vec = MODEL["flat-fp16 bytes per vector"] * per
    pred_ms = [MODEL["flat ms per 100k (busy 20k run)"] * per / 1e5,
               MODEL["flat ms per 100k (idle 1M, bench_scale)"] * per / 1e5]
    # N shards on C cores take about the largest shard's time per core (retrieval/sharded.py)
    waves = math.ceil(shards / 2)
    lines = [
        f"# A {n:,}-vector sharded index: {shards} flat-fp16 shards of uniform random 384-d unit vectors",
        "",
        *harness.run_lines(steps["env"]),
        "- load average at the start of each step: "
        + ", ".join(f"{k} {v['load']}" for k, v in steps.items() if isinstance(v, dict) and "load" in v),
        "",
        "## Built (one process per shard)",
        "",
        "| shard | vectors | build s (vectors generated + added) | index.faiss bytes | B/vector "
        "| model B/vector | docstore bytes (lines + offsets) | B/chunk | model B/chunk | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in builds:
        f = b["files"]
        doc = f["chunks.jsonl"] + f["chunks.offsets.npy"]
        lines.append(
            f"| {b['shard']} | {b['n']:,} | {b['total_s']:.1f} ({b['vectors_s']:.1f}) | "
            f"{f['index.faiss']:,} | {f['index.faiss'] / b['n']:.1f} | "
            f"{MODEL['flat-fp16 bytes per vector']:.1f} | {doc:,} | "
            f"{doc / b['n']:.1f} | {MODEL['docstore bytes per chunk']:.0f} | {b['rss_peak_mb']:,.0f} |"
        )
    lines += [
        "",
        f"Published (top manifest, shard files hard-linked): {steps['publish']['publish_s']:.1f} s.",
        "",
        "## Opened in a fresh process, as `open_index` does without the embedder",
        "",
        "| opened | verify s (SHA-256 of every file, structure, contents) | map + sample s | RSS MB before "
        "| RSS MB opened (anon / file) | peak RSS MB while opening | RSS MB after searches (anon / file) "
        "| model: resident vectors MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for which, label, count in (("0", "1 shard (shard-000)", 1), ("all", f"all {shards} shards", shards)):
        m = measured[which]
        b, o, s_ = m["rss_before"], m["rss_opened"], m["rss_searched"]
        lines.append(
            f"| {label} | {m['verify_s']:.1f} | {m['map_s']:.3f} | {b['VmRSS']:,.0f} | {o['VmRSS']:,.0f} "
            f"({o['RssAnon']:,.0f} / {o['RssFile']:,.0f}) | {o['VmHWM']:,.0f} | {s_['VmRSS']:,.0f} "
            f"({s_['RssAnon']:,.0f} / {s_['RssFile']:,.0f}) | {pred_vec * count / mb:,.0f} |"
        )
    lines += [
        "",
        f"## Single-query search, top-10 ({measured['queries']} queries, after 3 that page the vectors in)",
        "",
        "| search | p50 ms | p99 ms | model p50 ms (8.80 / 2.3 ms per 100k) |",
        "|---|---|---|---|",
    ]
    m1 = measured["0"]["per_shard"]["shard-000"]
    model_ms = f"{pred_ms[0]:.0f} / {pred_ms[1]:.0f}"
    lines.append(f"| shard-000 alone (its own process) | {m1[0]:.1f} | {m1[1]:.1f} | {model_ms} |")
    for name, (p50, p99) in measured["all"]["per_shard"].items():
        lines.append(f"| {name} (all open) | {p50:.1f} | {p99:.1f} | {model_ms} |")
    p50, p99 = measured["all"]["sharded"]
    lines.append(
        f"| all {shards} shards, `ShardedIndex` ({min(shards, 2)} threads) | {p50:.1f} | {p99:.1f} | "
        f"{waves * pred_ms[0] + MODEL['fan-out ms']:.0f} / {waves * pred_ms[1] + MODEL['fan-out ms']:.0f} |"
    )
    if "serve" in steps:
        sv = steps["serve"]
        lines += [
            "",
            f"Served by `RAG.from_index` (verify, map, MiniLM embedder on 1 thread; no generator), a fresh "
            f"process: opened in {sv['from_index_s']:.1f} s, RSS {sv['rss_loaded']['VmRSS']:,.0f} MB; "
            f"after 200 `retrieve` calls (top-10, the question embedded) RSS "
            f"{sv['rss_served']['VmRSS']:,.0f} MB, "
            f"retrieve p50 {sv['retrieve'][0]:.1f} ms, p95 {sv['retrieve'][1]:.1f} ms.",
        ]
    lines += [
        "",
        f"Model (docs/scale.md): {MODEL['flat-fp16 bytes per vector']} B per flat-fp16 vector, "
        f"{MODEL['docstore bytes per chunk']:.0f} B per docstore chunk (XQuAD chunks of ~256 tokens; these "
        "synthetic texts are ~70 characters), flat scan 8.80 ms per 100k (busy) or 2.3 (idle), "
        f"{shards} shards on 2 cores ≈ {waves} × one shard + {MODEL['fan-out ms']} ms fan-out.",
    ]
    return "\n".join(lines)


def scale(args: argparse.Namespace) -> None:
    log = harness.logger("bench_shards")
    args.work.mkdir(parents=True, exist_ok=True)
    state = args.work / "steps.json"
    steps = orjson.loads(state.read_bytes()) if state.exists() else {}
    env = harness.environment(gpu=False)
    if args.scale == "report":
        text = scale_report(args, steps)
        harness.write_report(text, md=args.out, json_path=args.json, data=steps)
        return
    key = f"shard-{args.shard}" if args.scale == "shard" else args.scale
    fn = {"shard": scale_shard, "publish": scale_publish, "measure": scale_measure,
          "serve": scale_serve}[args.scale]
    row = fn(args, log)
    row["load"] = env.get("load_avg_at_start")
    steps[key] = row
    steps.setdefault("env", env)
    state.write_bytes(orjson.dumps(steps, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--sizes", default="100000,300000", help="Corpus sizes, comma-separated.")
    ap.add_argument("--shards", default="2,4", help="Shard counts, comma-separated.")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument(
        "--target-ms", type=float, default=10.0, help="Per-shard flat search target of the sizing."
    )
    ap.add_argument(
        "--docstore",
        type=Path,
        default=harness.XQUAD_INDEX if harness.XQUAD_INDEX.exists() else None,
        help="An index whose docstore gives the bytes per chunk.",
    )
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--scale", choices=("shard", "publish", "measure", "serve", "report"),
                    help="One step of the large sharded index (see the module's docstring).")
    ap.add_argument("--shard", type=int, default=0, help="--scale shard: which shard to write.")
    ap.add_argument("--vectors", type=int, default=10_000_000, help="--scale: vectors over all shards.")
    ap.add_argument("--work", type=Path, default=harness.REPO / "indexes" / "bench-shards-scale",
                    help="--scale: where the steps leave their files.")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(orjson.dumps(child_scale(*args.child[1:]), option=orjson.OPT_SERIALIZE_NUMPY).decode())
        return
    if args.scale:
        scale(args)
        return
    log = harness.logger("bench_shards")
    env = harness.environment(gpu=False)
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(s) for s in args.shards.split(",")]
    queries = unit_vectors(args.queries, DIM, seed=99, kind="clustered")
    rows = [run(n, counts, queries, log) for n in sizes]
    doc_bytes, doc_where = docstore_bytes(args.docstore)
    lines = [
        "# Sharded search in process",
        "",
        *harness.run_lines(env),
        "",
        "Single-query latency in ms (p50 / p99), top-10, one thread per query and shard.",
        "",
        "| vectors | index | shards | p50 | p99 | fan-out p50 over one index | top-10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r["flat"]["single"]
        lines.append(f"| {r['n']:,} | flat-fp16 | 1 | {base[0]:.3f} | {base[1]:.3f} | — | reference |")
        for s in counts:
            p = r["flat"][s]["p50_p99"]
            lines.append(
                f"| {r['n']:,} | flat-fp16 | {s} | {p[0]:.3f} | {p[1]:.3f} | {p[0] - base[0]:+.3f} | "
                f"{'identical' if r['flat'][s]['exact'] else 'DIFFERENT'} |"
            )
        iv = r["ivf"]
        lines.append(
            f"| {r['n']:,} | ivf-fp16 nlist {iv['nlist']} nprobe {iv['nprobe']} | 1 | "
            f"{iv['single'][0]:.3f} | "
            f"{iv['single'][1]:.3f} | — | recall@10 vs exact {iv['single_vs_exact']:.4f} |"
        )
        for s in counts:
            p = iv[s]["p50_p99"]
            lines.append(
                f"| {r['n']:,} | ivf-fp16 (shared quantizer) | {s} | {p[0]:.3f} | {p[1]:.3f} | "
                f"{p[0] - iv['single'][0]:+.3f} | recall@10 vs one IVF {iv[s]['recall_vs_single']:.4f}, "
                f"vs exact {iv[s]['recall_vs_exact']:.4f} |"
            )
    largest = rows[-1]
    ms_per_100k = largest["flat"]["single"][0] / largest["n"] * 100_000
    bpv = {k: v for k, v in largest["bytes_per_vector"].items()}
    lines += [
        "",
        f"Bytes per vector (saved files, {largest['n']:,} vectors): "
        + ", ".join(f"{k} {v:.1f}" for k, v in bpv.items())
        + f"; docstore {doc_bytes:.0f} B/chunk ({doc_where}); flat-fp16 search "
        f"{ms_per_100k:.2f} ms per 100k vectors per query (p50, largest size).",
        "",
        "## Sizing",
        "",
        *sizing(bpv, doc_bytes, ms_per_100k, args.target_ms),
    ]
    harness.write_report(
        "\n".join(lines),
        md=args.out,
        json_path=args.json,
        data={"env": env, "rows": rows, "docstore_bytes_per_chunk": doc_bytes},
    )


if __name__ == "__main__":
    main()
