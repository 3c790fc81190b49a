"""What the ``ragserve`` commands print: progress bars, an answer, an evaluation, stats.

Kept apart from ``cli/main.py`` (the commands and their options) so that scripts print the
same way (``scripts/demo.py`` uses ``print_result``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

_PHASES = {"embed": "embedding chunks", "train": "training IVF centroids", "add": "adding vectors",
           "questions": "embedding questions", "reference": "embedding chunks for the exact reference",
           "latency": "timing single questions", "answers": "generating answers",
           "hash": "hashing source files", "read": "reading and chunking files"}


@contextmanager
def progress_bars(console: Console) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar per phase; yields the ``progress(phase, done, total)`` callback."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        tasks: dict[str, Any] = {}
        started: dict[str, float] = {}
        last = [time.perf_counter()]

        def on_progress(phase: str, done: int, total: int) -> None:
            now = time.perf_counter()
            if phase not in tasks:
                # Phases run one after another and report only when a step is done: this
                # phase began when the previous report came in.
                tasks[phase] = progress.add_task(_PHASES.get(phase, phase), total=total, rate="")
                started[phase] = last[0]
            last[0] = now
            rate = f"{done / max(now - started[phase], 1e-9):,.0f}/s" if phase in ("embed", "add", "questions") else ""
            progress.update(tasks[phase], completed=done, total=total, rate=rate)

        yield on_progress


@contextmanager
def question_progress(console: Console, label: str) -> Iterator[Callable[..., None]]:
    """The bar of a run over a file of questions (``batch``, ``warm``): done of total, rate,
    a note (failures), elapsed and ETA. Yields ``update(completed=, total=, rate=, note=)``.
    The bar appears, and its clock starts, at the first update: not while models load."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    progress = Progress(*columns, console=console)
    task = progress.add_task(label, total=None, start=False, rate="", note="")

    def update(**fields: Any) -> None:
        if not progress.live.is_started:
            progress.start()
            progress.start_task(task)
        progress.update(task, **fields)

    try:
        yield update
    finally:
        progress.stop()


def print_result(result: Any, console_: Console | None = None) -> None:
    c = console_ or Console(soft_wrap=True)
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
            f"tokens {result.usage.prompt_tokens}+{result.usage.completion_tokens}; cache {result.cache_tier}"
            f"{f'; model {result.model}' if result.model else ''}[/]",
            highlight=False)


def print_eval(out: Console, report: Any) -> None:
    from rich.table import Table

    from ragserve.eval.report import REEMBED_MAX

    d, i = report.dataset, report.index
    params = ", ".join(f"{k}={v}" for k, v in i["params"].items())
    search = ", ".join(f"{k}={v}" for k, v in i["search"].items())
    docs = "no documents" if d["documents"] is None else f"{d['documents']} documents"
    out.print(f"[bold]{d['name']}[/] ({d['kind']}): {docs}, {d['questions']} questions "
              f"({d['labelled']} with relevant documents); "
              f"index {i['type']}{f' ({params}; in use: {search})' if params else ''} over {i['chunks']} chunks, "
              f"{'reused' if i['reused'] else 'built'}: {i['path']}", highlight=False)
    for note in d["notes"]:
        out.print(f"  note: {note}", highlight=False)
    table = Table("metric", f"{i['type']}", "exact fp32 (IndexFlatIP)", title="retrieval")
    for row in report.rows():
        table.add_row(*row)
    out.print(table)
    if report.exact is None:
        out.print(f"  no exact reference: the index keeps no float32 vectors and has more than {REEMBED_MAX:,} "
                  "chunks to embed again", highlight=False)
    out.print("  latency: one question per call; retrieve = embed + search + docload", highlight=False)
    out.print(f"  single-question top document equals the batched pass for {report.single_matches_batched:.1%}"
              f" of questions; seconds {report.seconds}", highlight=False)
    if report.answers is not None:
        a = report.answers
        by = ", ".join(f"{m} ({n})" if len(a.models) > 1 else m for m, n in a.models.items()) or "none"
        table = Table("answers", "generated", "extractive baseline",
                      title=f"generation by model {by} ({a.questions} questions, {a.seconds:.0f} s)")
        table.add_row("contains a gold answer", f"{a.contains:.3f}", f"{a.baseline_contains:.3f}")
        table.add_row("exact match", f"{a.exact_match:.3f}", f"{a.baseline_exact_match:.3f}")
        table.add_row("token F1", f"{a.f1:.3f}", f"{a.baseline_f1:.3f}")
        table.add_row("content words found in the sources", f"{a.grounded:.3f}")
        table.add_row("answers with an ungrounded number or name", f"{a.ungrounded_share:.3f}")
        table.add_row("mean answer words", f"{a.mean_words:.1f}")
        table.add_row("cut at max_tokens", f"{a.cut_share:.3f}")
        table.add_row("empty", f"{a.empty_share:.3f}")
        table.add_row("errors", str(a.errors))
        out.print(table)
        out.print("  extractive baseline: the top source's window of the answer's own length with the most "
                  "question words (no model); the generator adds the difference", highlight=False)
        stages = ", ".join(f"{name} {s['p50_ms']:.1f}/{s['p95_ms']:.1f}" for name, s in (report.stages or {}).items())
        asked = report.config.get("model")
        out.print(f"  model asked for: {asked or 'none named (the default)'}; "
                  f"top_k {report.config['top_k']}, {report.config['concurrency']} in flight; "
                  f"stage ms p50/p95: {stages}", highlight=False)


def stats_view(data: dict[str, Any]) -> dict[str, Any]:
    """``rag.stats()`` from a saved file: a profiling report's stats.json keeps the timed
    pass's own stages and tiers beside the engine's whole-life stats."""
    if "timed_pass" in data:
        return {**(data.get("engine") or {}), **data["timed_pass"], "source": "timed pass of a profiling report"}
    return data


def print_stats(out: Console, stats: dict[str, Any]) -> None:
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
