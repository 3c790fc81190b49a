"""Where latency and memory go: workloads, cProfile across threads, memory_profiler, and the
bottleneck report that ties them to the pipeline's stages.

**Usage:**

    from ragserve.profiling import ReportSettings, run_report
    report = run_report("indexes/pydoc", "profiling/reports/pydoc-c8",
                        ReportSettings(questions=48, concurrency=8, repeat_share=0.25))
    print(report.folder / "bottleneck_report.md")

Or from a shell: ``python profiling/run_profile.py indexes/pydoc --concurrency 8``.
Every module here imports matplotlib, memory_profiler and the models inside the functions
that need them, so ``import ragserve`` stays light.
"""

from ragserve.profiling.report import Report, ReportSettings, run_report

__all__ = ["Report", "ReportSettings", "run_report"]
