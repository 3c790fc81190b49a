"""What ``ragserve build-index`` prints: the summary of a build and the ``--dry-run`` plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console


def print_plan(out: Console, plan: Any, out_dir: Path) -> None:
    """The ``--dry-run`` output: the plan and the files it names."""
    out.print(f"[bold]dry run[/]: nothing written to {out_dir}", highlight=False)
    out.print(f"  {plan.describe()}", highlight=False)
    for action in ("changed", "added"):
        _print_names(out, action, plan.names(action))
    _print_names(out, "deleted", plan.deleted)


def _print_names(out: Console, action: str, names: list[str], most: int = 20) -> None:
    if names:
        more = f" … and {len(names) - most} more" if len(names) > most else ""
        out.print(f"  {action}: {', '.join(names[:most])}{more}", highlight=False)


def print_build_summary(out: Console, report: Any) -> None:
    """What was built: incremental or full (and why), chunks embedded, index, fingerprint."""
    from rich.table import Table

    mib = 1024 * 1024
    if report.mode == "up to date":
        out.print(f"[bold green]index up to date[/] {report.out}: no file changed, no new version written "
                  f"(fingerprint {report.fingerprint[:16]})", highlight=False)
        return
    out.print(f"[bold green]index written[/] {report.out} → {report.version}", highlight=False)
    c = report.changes
    if report.mode == "incremental":
        out.print(f"  incremental: files unchanged {c['unchanged']}, changed {c['changed']}, added {c['added']}, "
                  f"deleted {c['deleted']}; chunks embedded {report.embedded} of {report.chunks} "
                  f"({report.chunks - report.embedded} kept from the previous index)", highlight=False)
    else:
        out.print(f"  full build ({report.reason or 'from documents'}): chunks embedded {report.embedded}",
                  highlight=False)
    out.print(f"  files read {report.files_read}, skipped {len(report.skipped)}; documents {report.documents}; "
              f"chunks {report.chunks} ({report.dim}-d)")
    out.print(f"  index {report.index_type} {report.index_params or ''}: {report.index_bytes / mib:.2f} MiB "
              f"(float32 vectors would take {report.fp32_bytes / mib:.2f} MiB)", highlight=False)
    if report.index_reason:
        out.print(f"  auto: {report.index_reason}", highlight=False)
    if report.quantizer:
        out.print(f"  IVF coarse quantizer {report.quantizer['action']}: {report.quantizer['reason']}",
                  highlight=False)
    out.print(f"  fingerprint {report.fingerprint[:16]}  seconds {report.seconds}")
    if report.cluster:
        _print_cluster(out, report.cluster)
    for shard in report.shards:
        out.print(f"  {shard['name']}: {shard['chunks']} chunks, {shard['action']}, fingerprint "
                  f"{shard['fingerprint'][:16]}", highlight=False)
    if report.skipped:
        table = Table("skipped file", "reason", title="files not indexed")
        for f in report.skipped:
            table.add_row(f.path, f.reason)
        out.print(table)


def _print_cluster(out: Console, cluster: dict[str, Any]) -> None:
    """Where a ``--ray`` build ran, and each embedding actor's share and rate."""
    c = cluster
    # A sharded build reads on this machine: its cluster record has no read tasks.
    read = (f"{c['files_read']} files in {c['read_tasks']} read tasks" if "read_tasks" in c
            else "files read on this machine")
    out.print(f"  ray: {c['how']} {c['address']} ({c['nodes']} nodes, {c['cpus']:g} CPUs); {read}; "
              f"{c['actors']} embedding actors", highlight=False)
    for a in c["per_actor"]:
        out.print(f"    actor {a['actor']} on {a['node']}: model loaded in {a['load_s']} s, {a['chunks']} "
                  f"chunks in {a['seconds']} s ({a['chunks_per_s']} chunks/s, {a['precision']})",
                  highlight=False)
