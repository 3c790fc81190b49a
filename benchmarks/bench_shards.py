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

Usage:
    python benchmarks/bench_shards.py --sizes 100000,300000 --shards 2,4
    python benchmarks/bench_shards.py --out reports/bench_shards.md --json reports/bench_shards.json
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
from bench_scale import unit_vectors
from harness import pcts

from ragserve.config import IndexConfig
from ragserve.retrieval.faiss_index import INDEX_FILE, FaissIndex
from ragserve.retrieval.index_spec import plan_index
from ragserve.retrieval.sharded import ShardedIndex

DIM = 384
GIB = 2**30
SIZES = (10_000_000, 100_000_000, 1_000_000_000)
"""Corpus sizes of the sizing table."""
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
    args = ap.parse_args()
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
