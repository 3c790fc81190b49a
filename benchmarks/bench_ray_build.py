"""``build-index --ray`` against the local build on one corpus (default about 20,000
chunks), side by side in one run, with a projection to N machines on paper.

The corpus is ``bench_incremental.py``'s: XQuAD's English paragraphs, a few per file,
each file made unique. One embedding model is loaded in this process and given to both
builds, so neither pays the driver's model load; the Ray build pays Ray's own start-up,
which is reported apart: starting (or connecting to) the cluster, and Ray Data starting
the embedding actors (each loading its model, in parallel) before the first slice. Both
builds are full builds into new folders, and the script checks that they wrote the same
index (fingerprint).

The projection takes the per-actor encoding rate measured here (chunks per second of
encode time, one actor per ``embed.threads`` CPUs) and the read-and-chunk CPU time, and
assumes machines like this one: the embedding and reading parts divide by the CPUs, the
rest (hashing the source, the actors' model load, building and writing the FAISS index
on the driver, Ray's start) does not. It is arithmetic, not a measurement.

Prints markdown with hardware and versions at the top. A benchmark, not a test: on a
shared machine read times as rough and compare the rows of one run.

Usage:
    python benchmarks/bench_ray_build.py --chunks 1500           # quick check
    python benchmarks/bench_ray_build.py --out reports/bench_ray_build.md --json reports/bench_ray_build.json
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import bench_incremental as bi
import harness
from harness import timed

MACHINES = (1, 2, 4, 8, 16, 32)


def build_rows(local: Any, local_s: float, ray: Any, ray_s: float) -> list[str]:
    def row(name: str, r: Any, wall: float) -> str:
        s = r.seconds
        embed = s.get("embed", 0) - s.get("actors", 0)
        return (f"| {name} | {wall:.1f} | {r.chunks / wall:,.0f} | {local_s / wall:.2f}× "
                f"| {s.get('scan', 0):.2f} | {s.get('ray_start', 0):.1f} | {s.get('read', 0):.1f} "
                f"| {s.get('actors', 0):.1f} | {embed:.1f} | {s.get('index', 0) + s.get('write', 0):.2f} |")

    return ["| build | wall s | chunks/s | speed vs local | hash s | Ray start s | read + chunk s "
            "| actors start s | embed s | index + write s |", "|---|---|---|---|---|---|---|---|---|---|",
            row("local (`build-index`)", local, local_s), row("Ray (`build-index --ray`)", ray, ray_s)]


def actor_rows(cluster: dict[str, Any]) -> list[str]:
    lines = ["| actor | node | model load s | chunks | encode s | chunks/s | precision |",
             "|---|---|---|---|---|---|---|"]
    for a in cluster["per_actor"]:
        lines.append(f"| {a['actor']} | {a['node']} | {a['load_s']:.1f} | {a['chunks']:,} "
                     f"| {a['seconds']:.1f} | {a['chunks_per_s']:.1f} | {a['precision']} |")
    return lines


def projection(ray: Any, cpus_here: float, cores: int, chunks: int, slice_size: int,
               machines: tuple[int, ...]) -> tuple[list[str], dict]:
    """Wall time on N machines of ``cores`` CPUs from this run's per-actor rate. An actor
    embeds whole slices (``embed_slices``: the local build's, which keeps the vectors
    equal), so embedding takes ceil(slices / actors) slice times, not chunks / actors."""
    c, s = ray.cluster, ray.seconds
    rate = sum(a["chunks"] for a in c["per_actor"]) / max(sum(a["seconds"] for a in c["per_actor"]), 1e-9)
    read_cpu_s = s.get("read", 0) * cpus_here  # the read tasks kept the cluster's CPUs busy
    fixed = s.get("scan", 0) + s.get("actors", 0) + s.get("index", 0) + s.get("write", 0)
    slices = math.ceil(chunks / slice_size)
    lines = [f"Per-actor rate {rate:.1f} chunks/s ({c['cpus_per_actor']} CPU each); {slices} slices of "
             f"{slice_size} chunks (embed.batch_size × 8); read + chunk ≈ {read_cpu_s:.1f} CPU-s; fixed part "
             f"{fixed:.1f} s (hash, actors' model load, FAISS index and write on the driver); Ray start not "
             "counted (connecting to a running cluster takes well under 1 s).",
             "", f"| machines × {cores} CPUs | actors | embed s | read + chunk s | total s | chunks/s |",
             "|---|---|---|---|---|---|"]
    rows = {}
    for m in machines:
        actors = max(1, m * cores // c["cpus_per_actor"])
        embed = math.ceil(slices / actors) * min(slice_size, chunks) / rate
        read = read_cpu_s / (m * cores)
        total = fixed + embed + read
        rows[m] = {"actors": actors, "embed_s": embed, "read_s": read, "total_s": total}
        lines.append(f"| {m} | {actors} | {embed:.1f} | {read:.1f} | {total:.1f} | {chunks / total:,.0f} |")
    if slices < max(rows[m]["actors"] for m in machines):
        lines += ["", f"Past {slices} actors the slices run out: a larger corpus, or a smaller "
                      "embed.batch_size (finer slices; vectors then differ from a build with the default by "
                      "rounding), keeps more actors busy."]
    return lines, {"per_actor_chunks_per_s": rate, "read_cpu_s": read_cpu_s, "fixed_s": fixed,
                   "slices": slices, "rows": rows}


def main() -> None:
    ap = harness.parser(__doc__, raw=False)
    ap.add_argument("--chunks", type=int, default=20_000, help="Approximate chunks in the generated corpus.")
    ap.add_argument("--actors", type=int, default=None, help="Embedding actors (default: one per CPU).")
    ap.add_argument("--ray-address", default="local",
                    help="'local' (default: a new cluster for this run, so its start-up is measured), "
                         "'auto' or HOST:PORT.")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None,
                    help="Folder for corpus and indexes (default: a temp dir).")
    ap.add_argument("--out", type=Path, default=None, help="Also write the markdown report here.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the raw figures here.")
    args = ap.parse_args()

    import ray as ray_module
    import torch

    from ragserve.build.builder import build_index, embed_slices
    from ragserve.config import RAGConfig
    from ragserve.ray.build import build_index_ray
    from ragserve.retrieval.embed import SentenceTransformerEmbedder

    config = RAGConfig()
    embedder = SentenceTransformerEmbedder(config.embed)
    embedder.warm_up()
    paras, _ = bi.paragraphs()
    per_file, n_files = bi.plan_files(args.chunks, paras, embedder, config, args.seed)
    env = harness.environment("ray", gpu=False)
    header = [*harness.machine_lines(env),
              f"{bi.describe_corpus(n_files, per_file, config)}; embedding "
              f"{embedder.precision}, batch {config.embed.batch_size}; local build: torch threads "
              f"{torch.get_num_threads()} in this process; Ray {ray_module.__version__}: --ray-address "
              f"{args.ray_address}, actors {args.actors or 'one per CPU'}; seed {args.seed}"]
    print("\n".join(header), flush=True)

    with bi.corpus_folder(args.work, "bench-ray-build-", n_files, paras, args.seed) as work:
        src = work / "corpus"
        local_s, local = timed(build_index, src, work / "local", config, embedder=embedder, full=True)
        print(f"local build: {local.chunks:,} chunks in {local_s:.1f} s {local.seconds}", flush=True)
        ray_s, ray = timed(build_index_ray, src, work / "ray", config, embedder=embedder, full=True,
                           address=args.ray_address, actors=args.actors, num_cpus=args.num_cpus)
        print(f"Ray build: {ray.chunks:,} chunks in {ray_s:.1f} s {ray.seconds}", flush=True)

    c = ray.cluster
    same = "yes" if ray.fingerprint == local.fingerprint else "NO (the fingerprints differ)"
    cores = os.cpu_count() or 1
    first = embed_slices(ray.chunks, config.embed.batch_size)[0]  # the slices both builds embedded
    slice_size = first[1] - first[0]
    proj_lines, proj = projection(ray, c["cpus"], cores, ray.chunks, slice_size, MACHINES)
    lines = [f"# `build-index --ray` vs local build: {ray.chunks:,} chunks", "", *[f"- {h}" for h in header],
             f"- Ray: {c['how']} at {c['address']}, {c['nodes']} node(s), {c['cpus']:g} CPUs; "
             f"{c['files_read']:,} files in {c['read_tasks']} read tasks; {c['actors']} embedding actors",
             f"- Same index as the local build (fingerprint): {same}",
             f"- Local embedding rate (this process, {torch.get_num_threads()} torch threads): "
             f"{local.chunks / max(local.seconds.get('embed', 0), 1e-9):,.1f} chunks/s", "",
             "## Builds", "", *build_rows(local, local_s, ray, ray_s), "",
             "Ray start: the cluster started (or connected to) for this build; actors start: Ray Data "
             "starting the embedding actors, each loading its model in parallel, until the first slice came "
             "back (less its encode time); read + chunk: Ray tasks, including each worker's first imports "
             "(llama-index, the tokenizer).", "",
             "## Embedding actors", "", *actor_rows(c), "",
             "## Projection on paper to N machines like this one", "", *proj_lines, "",
             f"Load average at the end: {[round(x, 2) for x in os.getloadavg()]}"]
    raw = {"environment": env, "chunks": ray.chunks, "files": n_files,
           "local": {"wall_s": local_s, **local.seconds}, "ray": {"wall_s": ray_s, **ray.seconds},
           "cluster": c, "same_index": ray.fingerprint == local.fingerprint, "projection": proj}
    print()
    harness.write_report("\n".join(lines), args.out, args.json, raw)


if __name__ == "__main__":
    main()
