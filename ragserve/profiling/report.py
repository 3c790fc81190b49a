"""``run_report``: one profiling run against a built index, written as a report folder.

Phases, each shaded on the memory timeline:

1. **build**: a small index built from the first documents of the index's own docstore,
   under memory_profiler's line profiler (``memory_build.txt``);
2. **load**: opening the index and the first queries, line by line (``memory_load.txt``);
   with an existing ``RAG`` (tests reuse the session engine) a second, engine-less RAG is
   opened and asked retrieval-only questions, so no second vLLM engine starts;
3. **timed pass**: the workload with no profiler attached; its per-query ``Timings`` give
   the stage breakdown (``stage_breakdown.md`` / ``.png``, ``queries.json``, ``stats.json``);
4. **profiled pass**: the same workload shape with other questions under cProfile in every
   pipeline thread (``profile.prof``, ``profile_top.txt``, ``profile_by_stage.txt``). It is
   a separate pass because cProfile slows Python code several-fold, which would distort
   the timed stages.

``bottleneck_report.md`` ties them together (see ``bottleneck.py``).

**Usage:** ``run_report("indexes/pydoc", "profiling/reports/pydoc", ReportSettings(concurrency=8))``
or ``run_report(rag, folder, settings)`` with an open ``RAG``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ragserve.observe.timing import StageStats
from ragserve.profiling.breakdown import Group, breakdown, markdown, stacked_bar
from ragserve.profiling.cprof import StageGroup, ThreadProfiler, attribute, stage_text, top_text
from ragserve.profiling.env import environment
from ragserve.profiling.memory import LineMemory, MemoryTimeline, line_profile
from ragserve.profiling.workload import WorkloadResult, load_questions, run_workload


@dataclass(frozen=True)
class ReportSettings:
    """What a profiling run does. Every field has a default that suits the demo index."""

    questions: int = 48
    """Queries per pass (new questions plus repeats)."""
    concurrency: int = 8
    """Clients asking at once; each asks its next question when answered."""
    repeat_share: float = 0.25
    """Share of the queries that repeat an already answered question (cache hits)."""
    l2_share: float = 0.3
    """Share of repeats whose L1 entry is dropped first, so Redis (L2) answers them."""
    question_source: str = "corpus"
    """"corpus" (questions made from the index's chunks) or a .txt / SQuAD-style .json file."""
    seed: int = 0
    profile_pass: bool = True
    """Run the second, cProfiled pass (off: no .prof, nothing to attribute)."""
    profile_questions: int | None = None
    """Queries in the profiled pass (None: as many as ``questions``); fewer is enough to
    see where this process spends its time, and saves a pass's worth of generation."""
    build_docs: int = 12
    """Documents of the index's docstore rebuilt as a small index for the build's memory."""
    first_queries: int = 3
    """Queries asked in the load phase (line-by-line memory)."""
    memory_interval_s: float = 0.1


@dataclass
class Report:
    folder: Path
    groups: dict[str, Group]
    timed: WorkloadResult
    profiled: WorkloadResult | None
    stages: dict[str, StageGroup]
    threads: dict[str, dict[str, float]]
    memory: dict[str, Any]
    models: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def _write(path: Path, data: Any) -> None:
    if isinstance(data, str):
        path.write_text(data, "utf-8")
    else:
        path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS,
                                      default=str))


def _small_corpus(docstore: Any, folder: Path, n_docs: int) -> int:
    """The first ``n_docs`` documents of a docstore as .txt files (chunks joined)."""
    docs: dict[str, list[str]] = {}
    for cid in range(len(docstore)):
        c = docstore.get(cid)
        if c.doc_id not in docs and len(docs) >= n_docs:
            break
        docs.setdefault(c.doc_id, []).append(c.text)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (doc_id, texts) in enumerate(docs.items()):
        (folder / f"{i:03d}_{Path(doc_id).stem}.txt").write_text("\n\n".join(texts), "utf-8")
    return len(docs)


def _open_and_ask(index: Path, config: Any, questions: list[str], start_engine: bool) -> Any:
    """Open an index and ask the first questions (the function the load phase profiles)."""
    from ragserve.rag import RAG

    rag = RAG.from_index(index, config, start_engine=start_engine)
    for q in questions:
        if start_engine:
            rag.query(q)
        else:
            rag.retrieve(q)
    return rag


def _memory_phases(rag: Any, index: Path, config: Any, settings: ReportSettings, first: list[str],
                   timeline: MemoryTimeline, out: Path) -> tuple[Any, dict[str, list[LineMemory]]]:
    from ragserve.build.builder import (
        _embed_all,
        _index_and_publish,
        _ready,
        build_index,
        finish_build,
        start_build,
    )
    from ragserve.build.incremental import gather
    from ragserve.rag import RAG
    from ragserve.retrieval.docstore import LazyDocStore

    lines: dict[str, list[LineMemory]] = {}
    with tempfile.TemporaryDirectory(prefix="ragserve-profile-") as tmp:
        store = rag.docstore if rag is not None else LazyDocStore(index)
        n = _small_corpus(store, Path(tmp) / "corpus", settings.build_docs)
        with timeline.phase("build"):
            # start_build plans and (_ready) loads the model; gather reads and chunks;
            # finish_build embeds (_embed_all), and _index_and_publish builds the FAISS index
            # and writes the folder.
            _, text, lines["build"] = line_profile(build_index, (Path(tmp) / "corpus", Path(tmp) / "index", config),
                                                   extra=[start_build, _ready, gather, finish_build,
                                                          _embed_all, _index_and_publish])
        _write(out / "memory_build.txt", f"# build_index over {n} documents of {index}\n{text}")
        if rag is None:
            store.close()
    owned = rag is None
    with timeline.phase("load"):
        opened, text, lines["load"] = line_profile(_open_and_ask, (index, config, first, owned),
                                                   extra=[RAG.from_index.__func__])
    note = ("" if owned else "# An engine was passed in: this RAG was opened without one (start_engine=False) "
            "and asked retrieval-only questions, so no second vLLM engine starts.\n")
    _write(out / "memory_load.txt", f"# RAG.from_index({index}) and {len(first)} first queries\n{note}{text}")
    if not owned:
        opened.close()
        return rag, lines
    return opened, lines


def _pass(rag: Any, pool: list[str], s: ReportSettings, seed: int, n: int) -> WorkloadResult:
    return run_workload(rag, pool, n=n, concurrency=s.concurrency, repeat_share=s.repeat_share,
                        l2_share=s.l2_share, seed=seed)


def _run_stats(result: WorkloadResult) -> dict[str, Any]:
    stats = StageStats(window=max(len(result.records), 1))
    for r in result.ok():
        # Timings carry every field; a hit never ran the stages left at 0, so they are not samples.
        kept = r.timings if r.tier == "miss" else {k: v for k, v in r.timings.items() if v or k == "total"}
        stats.record(kept, r.tier)
    return {"stages": stats.summary(), "tiers": stats.tiers()}


def _holders(rag: Any, index: Path) -> dict[str, Any]:
    """What holds memory: model weights, index files, caches, per-process USS/PSS now."""
    import psutil

    from ragserve.profiling.memory import folder_mib, torch_module_mib

    out: dict[str, Any] = {}
    model = getattr(rag.embedder, "model", None)
    if model is not None and hasattr(model, "parameters"):
        out["embedder_weights_mib"] = torch_module_mib(model)
    gen = rag.generator
    if gen is not None and getattr(gen, "path", None):
        out["generator_files_mib"] = folder_mib(gen.path)
    files = rag.manifest.data.get("files", {})
    out["index_files_mib"] = {k: round(v["bytes"] / 2**20, 2) for k, v in files.items()}
    if rag.cache is not None:
        out["l1_cache_mib"] = round(rag.cache.l1.bytes / 2**20, 3)
    out["kv_cache_gib_configured"] = rag.config.vllm.kv_cache_gib
    procs = {}
    me = psutil.Process(os.getpid())
    for p in [me, *me.children(recursive=True)]:
        try:
            m = p.memory_full_info()
            procs[f"{'this process' if p is me else p.name()} (pid {p.pid})"] = {
                "rss_mib": round(m.rss / 2**20, 1), "uss_mib": round(m.uss / 2**20, 1),
                "pss_mib": round(getattr(m, "pss", 0) / 2**20, 1)}
        except psutil.Error:
            continue
    out["processes"] = procs
    return out


def run_report(target: Any, out: str | os.PathLike[str], settings: ReportSettings | None = None,
               config: Any = None) -> Report:
    """Profile a workload and write the report folder ``out``. ``target`` is an index
    folder (a RAG is opened with ``config`` and closed at the end) or an open ``RAG``."""
    from ragserve.config import RAGConfig
    from ragserve.profiling.bottleneck import write_report

    s = settings or ReportSettings()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rag = None if isinstance(target, (str, os.PathLike)) else target
    index = Path(target) if rag is None else Path(rag.manifest.folder)
    config = rag.config if rag is not None else (config or RAGConfig.load())
    env = environment()
    timeline = MemoryTimeline(s.memory_interval_s).start()
    owned = rag is None
    try:
        from ragserve.retrieval.docstore import LazyDocStore

        store = rag.docstore if rag is not None else LazyDocStore(index)
        n_prof = s.profile_questions or s.questions
        new_timed = s.questions - round(s.questions * s.repeat_share)
        new_prof = n_prof - round(n_prof * s.repeat_share)
        pool = load_questions(s.question_source, store, new_timed + new_prof + s.first_queries, s.seed)
        if rag is None:
            store.close()
        first, timed_pool = pool[:s.first_queries], pool[s.first_queries:]
        # Fresh questions for the profiled pass when the pool has enough; else the same ones
        # (a new cache namespace keeps them misses, though vLLM's prefix cache is then warm).
        prof_pool = timed_pool[new_timed:] if len(timed_pool) >= new_timed + new_prof else timed_pool
        rag, lines = _memory_phases(rag, index, config, s, first, timeline, folder)
        with timeline.phase("timed pass"):
            timed = _pass(rag, timed_pool, s, s.seed, s.questions)
        holders = _holders(rag, index)
        models = {"generation": getattr(rag.generator, "model_name", config.generate.model),
                  "embedding": str(getattr(rag.embedder, "identity", {}).get("name") or config.embed.model)}
        engine_stats = rag.stats()
        profiled, stages, threads = None, {}, {}
        if s.profile_pass:
            prof = ThreadProfiler(rag)
            with timeline.phase("profiled pass"):
                prof.start()
                try:
                    profiled = _pass(rag, prof_pool, s, s.seed + 1, n_prof)
                finally:
                    prof.stop()
            merged = prof.dump(folder / "profile.prof")
            threads = prof.thread_times()
            stages = attribute(merged)
            _write(folder / "profile_top.txt", top_text(str(folder / "profile.prof")))
            _write(folder / "profile_by_stage.txt", stage_text(stages, threads))
    finally:
        timeline.stop()
        if owned and rag is not None:
            rag.close()
    timeline.plot(folder / "memory_timeline.png", f"memory and phases: {index.name}")
    groups = breakdown(timed.records)
    _write(folder / "stage_breakdown.md", markdown(groups))
    stacked_bar(groups, folder / "stage_breakdown.png")
    _write(folder / "queries.json", {"timed": timed.to_dict(), "profiled": profiled.to_dict() if profiled else None})
    _write(folder / "stats.json", {"timed_pass": _run_stats(timed), "engine": engine_stats})
    _write(folder / "memory_timeline.json", timeline.to_dict())
    memory = {"peak": timeline.peak(), "holders": holders, "phases": timeline.phases,
              "cpu_timed_pass": timeline.cpu_during("timed pass"),
              "top_lines": {k: [asdict(x) for x in v[:8]] for k, v in lines.items()}}
    report = Report(folder, groups, timed, profiled, stages, threads, memory, models)
    report.summary = write_report(report, env, settings=asdict(s), config=config, index=index)
    return report
