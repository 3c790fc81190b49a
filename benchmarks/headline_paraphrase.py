"""Paraphrase mode of ``bench_headline.py`` (``--paraphrase 0.3,0.5``): the headline stream
with its repeats reworded, semantic tier on against exact tiers only, through the real
``ragserve serve`` and engine.

The stream: the headline Zipf stream, each repeat of a question reworded with probability
p by ``ragserve.profiling.workload.paraphrase_repeats`` (its meaning-keeping rewrites; the
texts ``bench_semantic.py`` measures without an engine, for the same n, s, seed and p).
Each system chosen runs each p's stream; ``ragserve`` then runs again as
``ragserve-semantic``, on a server started afresh with ``[semantic]`` on at
``--semantic-threshold`` and the default guard (the tier is a server setting, and the
exact-only server is stopped first: one engine on the machine at a time).

Reported per (p, system): hits by tier (l1, l2, semantic, shared), the stream's ceiling
for repeated meanings (1 − distinct meanings ÷ requests) and the hits as a share of it,
requests/s, p50/p95 and the generations the engine ran (``headline_report.paraphrase_table``);
per p, the semantic tier's gain over exact-only and the issue's targets.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

SEMANTIC = "ragserve-semantic"
"""ragserve with ``[semantic]`` on: the second run of ``ragserve`` in this mode."""


def streams(questions: list[Any], args: Any, s: float) -> dict[float, list[Any]]:
    """p → the headline stream with its repeats reworded with probability p (the questions
    keep their ids and gold answers: a rewording asks the same)."""
    from ragserve.profiling.workload import paraphrase_repeats, zipf_stream

    base = zipf_stream(questions, args.n, s=s, seed=args.seed)
    return {p: [replace(q, text=text) for q, text in
                paraphrase_repeats(base, p, lambda q: q.text, seed=args.seed, key=lambda q: q.qid)]
            for p in args.paraphrase}


async def run_paraphrase(bench: Any, s: float, quality_lines: Any) -> tuple[list[dict[str, Any]], list[str],
                                                                           dict[str, Any]]:
    """Every (p, system) run; returns the rows (in p order), the report's lines and each
    run's requests by label."""
    import headline_report as hr
    import headline_systems as hs

    a = bench.args
    by_p = streams(bench.dataset.questions, a, s)
    order = [n for n in a.systems if n in bench.systems]
    runs: dict[tuple[float, str], tuple[dict[str, Any], list[hr.Req]]] = {}

    async def one(p: float, name: str, stream: list[Any]) -> None:
        row, reqs = await bench.run(name, stream, f"{name} p={p:g}")
        row.update(hr.paraphrase_fields(reqs, p, name))
        runs[(p, name)] = (row, reqs)

    for p, stream in by_p.items():
        distinct = list({q.text: q for q in stream}.values())
        for name in order:
            await one(p, name, distinct if name == "ragserve-distinct" else stream)
    if "ragserve" in bench.systems:
        await bench.restart_server({"RAGSERVE_SEMANTIC_ENABLED": "true",
                                    "RAGSERVE_SEMANTIC_THRESHOLD": str(a.semantic_threshold)},
                                   "server-semantic.log")
        bench.systems[SEMANTIC] = hs.RagserveHttp(SEMANTIC, bench.server, bench.client, bench.admin_key,
                                                  cache=True)
        order.append(SEMANTIC)
        for p, stream in by_p.items():
            await one(p, SEMANTIC, stream)
    rows = [runs[(p, n)][0] for p in by_p for n in order if (p, n) in runs]
    lines = ["Paraphrased repeats: hits by tier as shares of the requests; ceiling = 1 − distinct meanings "
             "÷ requests (no cache can serve a meaning's first request); hits include single-flight joins "
             "(shared).", "", *hr.paraphrase_table(rows), "",
             *hr.paraphrase_lines(rows, "ragserve", SEMANTIC)]
    for p in by_p:
        lines += quality_lines({n: runs[(q, n)] for q, n in runs if q == p}, bench.golds, f" p={p:g}")
    return rows, lines, {row["system"]: reqs for row, reqs in runs.values()}
