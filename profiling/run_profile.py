"""Profile a workload against a built index and write a bottleneck report folder.

Usage:
    python profiling/run_profile.py indexes/pydoc --questions 48 --concurrency 8 \\
        --repeat-share 0.25 --out profiling/reports/pydoc-c8

The report folder holds ``bottleneck_report.md`` (start there), the stage breakdown
(table + PNG), the cProfile (``profile.prof``, text summaries by function and by stage)
and memory_profiler output (line-by-line build and load, the timeline PNG). See
``profiling/README.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# This checkout's ragserve, not whichever one is installed in the environment.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("index", type=Path, help="a built index folder")
    ap.add_argument("--questions", type=int, default=48, help="queries per pass")
    ap.add_argument("--concurrency", type=int, default=8, help="clients asking at once")
    ap.add_argument("--repeat-share", type=float, default=0.25, help="share of queries that repeat an answered one")
    ap.add_argument("--l2-share", type=float, default=0.3, help="share of repeats answered by Redis (L1 dropped)")
    ap.add_argument("--question-source", default="corpus",
                    help='"corpus" (made from the index) or a file: one question per line, or SQuAD/XQuAD .json')
    ap.add_argument("--max-tokens", type=int, default=None, help="override generate.max_tokens")
    ap.add_argument("--redis", default="embedded", help='L2: "embedded" (default), a redis:// URL, or "" for none')
    ap.add_argument("--no-profile-pass", action="store_true", help="skip the cProfiled pass")
    ap.add_argument("--profile-questions", type=int, default=None, help="queries in the cProfiled pass (default: --questions)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=Path, default=None, help="a ragserve TOML config")
    ap.add_argument("--out", type=Path, default=None, help="report folder (default profiling/reports/INDEX-cC-TIME)")
    args = ap.parse_args()

    from ragserve.config import RAGConfig
    from ragserve.profiling import ReportSettings, run_report

    config = RAGConfig.load(args.config)
    changes: dict[str, dict[str, object]] = {"cache": {"redis_url": args.redis}}
    if args.max_tokens:
        changes["generate"] = {"max_tokens": args.max_tokens}
    config = config.replace(**changes)
    settings = ReportSettings(questions=args.questions, concurrency=args.concurrency, repeat_share=args.repeat_share,
                              l2_share=args.l2_share, question_source=args.question_source, seed=args.seed,
                              profile_pass=not args.no_profile_pass, profile_questions=args.profile_questions)
    out = args.out or Path("profiling/reports") / f"{args.index.name}-c{args.concurrency}-{time.strftime('%Y%m%d-%H%M%S')}"
    t = time.perf_counter()
    report = run_report(args.index, out, settings, config)
    print(f"report written to {report.folder} in {time.perf_counter() - t:.0f} s:")
    for finding in report.summary.get("findings", []):
        print(f"  - {finding}")
    print(f"open {report.folder / 'bottleneck_report.md'}")


if __name__ == "__main__":  # vLLM's engine starts a process: the guard is required
    sys.exit(main())
