"""The headline benchmark (issue 14): a realistic question stream, served through HTTP, side
by side with the recipes users copy today, in ONE run on one machine.

The stream: N requests drawn i.i.d. Zipf(s) from a question set (XQuAD-en by default; any
SQuAD or BEIR file), a fixed random popularity ranking (``--seed``) — popular questions come
back, most are asked once. Closed loop with C clients (``--concurrency``; each sends its next
request when its last one is answered) or open loop at a rate (``--rate`` requests/s,
Poisson arrivals, ``--max-open`` bounds what is in flight). ``--s 0.8,1.0,1.2`` sweeps the
law's exponent.

Systems (``--systems``; same models, same engine settings, same greedy decoding):

- ``ragserve``: (a) ``ragserve serve`` over HTTP (native API), answer cache on (L1 + the
  benchmark's Redis);
- ``ragserve-nocache``: (b) the same server with the cache off per request;
- ``langchain``: (c) FAISS retriever with the same MiniLM embeddings → prompt → ``ChatOpenAI``
  on vLLM's OpenAI server, LangChain's Redis LLM cache (``set_llm_cache``) on the same Redis,
  ``ainvoke`` from C concurrent clients (``bench_headline_langchain.py``);
- ``llamaindex``: (d) LlamaIndex + vLLM's OpenAI server, no answer cache (the peer of
  ``bench_serving.py``);
- ``ragserve-distinct``: not a system but a yardstick for the misses: the stream's distinct
  questions, each once, cache off, C clients — the engine's generation rate when every
  client waits on a generation of its own (``bench_serving.py``'s workload).

``--paraphrase 0.3,0.5`` (``headline_paraphrase.py``): the stream's repeats reworded with
probability p, and ``ragserve`` run twice per p, exact tiers only and then with the
semantic tier on at ``--semantic-threshold`` (a second server): hits by tier, the stream's
ceiling for repeated meanings, requests/s, p95, generations at the engine.

(c) and (d) live outside the project's lock: ``make bench-deps`` installs them into
``build/bench-peer``; without them they are skipped with a message. Before each system's
run: an emptied answer cache (a new ragserve namespace; LangChain's keys deleted) and an
emptied vLLM prefix cache. The report (``headline_report.py``): requests/s, p50/p95/p99,
hit rate by tier, distinct questions, generations counted at vLLM, CPU-seconds per request,
answer fidelity, contains-gold of cached against fresh answers; markdown, JSON and a PNG of
latency CDFs.

Run (repo root, an otherwise idle machine; ``make bench-deps`` first for (c) and (d)):

    python benchmarks/bench_headline.py --out reports/headline                   # 2,000 requests, C=32
    python benchmarks/bench_headline.py --n 24 --concurrency 8 --systems ragserve,ragserve-nocache  # the test's size
    python benchmarks/bench_headline.py --days --systems ragserve,langchain --out reports/headline-days
    python benchmarks/bench_headline.py --paraphrase 0.3,0.5 --semantic-threshold 0.8 --systems ragserve \
        --out reports/headline-paraphrase

A benchmark, not a test: it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import bench_serving_workload as wl
import harness
import headline_days
import headline_paraphrase
import headline_report as hr
import headline_systems as hs
from harness import CpuSampler

from ragserve.profiling.env import PEER_PACKAGES

SYSTEMS = ("ragserve", "ragserve-nocache", "langchain", "llamaindex", "ragserve-distinct")
ROLES = {"ours": "ragserve", "recipe": "langchain", "peer": "llamaindex"}
ADMIN_KEY = "headline-admin-key-0123456789"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = harness.parser(__doc__)
    ap.add_argument("--index", type=Path, default=harness.XQUAD_INDEX)
    ap.add_argument("--questions", type=Path, default=harness.XQUAD, help="SQuAD/XQuAD .json or a BEIR folder")
    ap.add_argument("--n", type=int, default=2000, help="requests per stream")
    ap.add_argument("--s", default="1.1", help="Zipf exponent(s), comma-separated for a sweep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=32, help="closed loop: clients")
    ap.add_argument("--rate", type=float, default=None, help="open loop: requests/s (Poisson); overrides C")
    ap.add_argument("--max-open", type=int, default=512, help="open loop: most requests in flight")
    ap.add_argument("--days", action="store_true", help="yesterday/today mode: today's stream cold and after "
                    "warming with yesterday's (ragserve warm; LangChain: yesterday's traffic)")
    ap.add_argument("--paraphrase", default=None, help="paraphrase mode: comma-separated probabilities that "
                    "a repeat is reworded; ragserve runs with exact tiers only and with the semantic tier")
    ap.add_argument("--semantic-threshold", type=float, default=None, help="paraphrase mode: the semantic "
                    "tier's threshold (what `ragserve calibrate-semantic` certified for the index's model)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from: {', '.join(SYSTEMS)}")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=harness.REPO / "reports" / "headline")
    ap.add_argument("--peer-overlay", type=Path, default=harness.REPO / "build" / "bench-peer")
    ap.add_argument("--request-timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    args.s = [float(x) for x in args.s.split(",")]
    args.systems = [n.strip() for n in args.systems.split(",") if n.strip()]
    if unknown := set(args.systems) - set(SYSTEMS):
        ap.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    if args.n < 1 or args.concurrency < 1:
        ap.error("--n and --concurrency must be >= 1")
    if args.semantic_threshold is not None and args.paraphrase is None:
        ap.error("--semantic-threshold goes with --paraphrase")
    if args.paraphrase is not None:
        try:
            args.paraphrase = [float(x) for x in args.paraphrase.split(",")]
        except ValueError:
            ap.error(f"--paraphrase: comma-separated probabilities, got {args.paraphrase!r}")
        if not all(0.0 <= p <= 1.0 for p in args.paraphrase):
            ap.error(f"--paraphrase: probabilities in [0, 1], got {args.paraphrase}")
        if args.days or len(args.s) > 1:
            ap.error("--paraphrase takes one --s and no --days")
        if "ragserve" in args.systems and args.semantic_threshold is None:
            ap.error("--paraphrase needs --semantic-threshold: the threshold `ragserve calibrate-semantic` "
                     "certified for the index's embedding model (docs/semantic.md)")
    return args


log = harness.logger("headline", sys.stdout)


OTHER = "other"


def system_labels(pids: set[int]) -> Any:
    """``CpuSampler``'s labels for one system's run: this benchmark, the system's processes
    by name (``VLLM::EngineCore``, the server's ``python``, ``redis-server``), and OTHER for
    this benchmark's children that serve another system (left out of its CPU)."""
    def label(pid: int) -> str:
        if pid == os.getpid():
            return "benchmark (clients)"
        if pid not in pids:
            return OTHER
        return harness.process_name(pid)

    return label


async def drive(system: Any, stream: list[Any], args: argparse.Namespace) -> tuple[list[hr.Req], float]:
    """Send the stream: closed loop with C clients, or open loop at ``--rate``."""
    from ragserve.cache.keys import normalize_question
    from ragserve.profiling.workload import poisson_arrivals

    reqs = [hr.Req(i, q.qid, normalize_question(q.text), 0.0) for i, q in enumerate(stream)]
    t0 = time.perf_counter()

    async def one(r: hr.Req, text: str, arrived_s: float | None = None) -> None:
        # open loop: latency counts from the arrival, a wait for --max-open included
        r.sent_s = time.perf_counter() - t0 if arrived_s is None else arrived_s
        try:
            r.answer, r.tier, *match = await asyncio.wait_for(system.ask(text), args.request_timeout)
            r.match = match[0] if match else None
        except Exception as e:  # one failed request is recorded, never fatal
            r.tier, r.error = "error", f"{type(e).__name__}: {e}"[:300]
        r.done_s = time.perf_counter() - t0

    if args.rate is None:
        await harness.run_clients(zip(reqs, stream), args.concurrency, lambda rq: one(rq[0], rq[1].text))
    else:
        gate = asyncio.Semaphore(args.max_open)

        async def gated(r: hr.Req, text: str, arrived_s: float) -> None:
            async with gate:
                await one(r, text, arrived_s)

        tasks = []
        for at, r, q in zip(poisson_arrivals(len(stream), args.rate, args.seed), reqs, stream):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            tasks.append(asyncio.create_task(gated(r, q.text, time.perf_counter() - t0)))
        await asyncio.gather(*tasks)
    return reqs, time.perf_counter() - t0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.systems: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self._closers: list[Any] = []
        self.admin_key = ADMIN_KEY

    async def start(self) -> None:
        from ragserve.cache.redis_server import RedisServer
        from ragserve.config import RAGConfig
        from ragserve.eval.datasets import load_dataset

        a = self.args
        self.env = harness.environment(*PEER_PACKAGES, "psutil")  # before the run: the machine's load average
        a.out.mkdir(parents=True, exist_ok=True)
        self.cfg = RAGConfig.load().replace(generate={"max_tokens": a.max_tokens})
        self.notes.append(f"index: {wl.ensure_index(a.index, harness.XQUAD, self.cfg)}")
        self.dataset = load_dataset(a.questions)
        self.golds = {q.qid: q.answers for q in self.dataset.questions}
        self.redis = RedisServer(maxmemory="1gb")
        self.redis.start()
        self._closers.append(self.redis.stop)
        self.server_env = {"RAGSERVE_GENERATE_MAX_TOKENS": str(a.max_tokens),
                           "RAGSERVE_SERVER_ADMIN_KEY": ADMIN_KEY,
                           "RAGSERVE_REDIS_URL": self.redis.url, "RAGSERVE_CACHE_ENABLED": "true",
                           "RAGSERVE_QUERY_MAX_IN_FLIGHT": str(max(64, a.concurrency)),
                           "RAGSERVE_QUERY_MAX_QUEUED": str(max(256, a.max_open))}
        await self._start_server({}, "server.log")
        for name, cache in (("ragserve", True), ("ragserve-nocache", False), ("ragserve-distinct", False)):
            if name in a.systems:
                self.systems[name] = hs.RagserveHttp(name, self.server, self.client, ADMIN_KEY, cache=cache)
        if {"langchain", "llamaindex"} & set(a.systems):
            await self._start_peers()

    async def _start_server(self, extra_env: dict[str, str], log_name: str) -> None:
        from ragserve.server.process import ServerProcess

        a = self.args
        t = time.perf_counter()
        server = ServerProcess(a.index, env={**self.server_env, **extra_env}, log=a.out / log_name)
        self.server = await asyncio.to_thread(server.start)
        self._closers.append(self.server.stop)
        settings = "".join(f", {k}={v}" for k, v in extra_env.items())
        log(f"ragserve serve up at {self.server.url} in {time.perf_counter() - t:.0f} s "
            f"(Redis {self.redis.url}{settings})")
        self.client = harness.http_client(self.server.url, timeout=a.request_timeout, connections=1024)

    async def restart_server(self, extra_env: dict[str, str], log_name: str) -> None:
        """Stop ``ragserve serve`` and start another with ``extra_env`` added to its settings
        (the systems made on the old one are left pointing at it: make new ones)."""
        await self.client.aclose()
        await asyncio.to_thread(self.server.stop)
        await self._start_server(extra_env, log_name)

    async def _start_peers(self) -> None:
        import httpx

        a = self.args
        if a.peer_overlay.is_dir():
            sys.path.append(str(a.peer_overlay))  # appended: the venv's own packages always win
        wanted = [n for n in ("langchain", "llamaindex") if n in a.systems]
        importable = {}
        for name, mod in (("langchain", "bench_headline_langchain"), ("llamaindex", "llama_index.llms.openai_like")):
            try:
                __import__(mod)
                if name == "langchain":
                    import langchain_openai  # noqa: F401
                importable[name] = True
            except ImportError as e:
                self.skipped[name] = f"its packages are not importable ({e}); `make bench-deps` installs them"
        if not any(importable.get(n) for n in wanted):
            return
        import bench_serving_peer as peer

        from ragserve.models.resolve import resolve_embedding_model, resolve_generation_model
        from ragserve.retrieval.docstore import LazyDocStore

        embed_path = resolve_embedding_model(self.cfg.embed.model)
        store = LazyDocStore(a.index)
        chunks = store.get_many(list(range(len(store))))
        store.close()
        self.peer = peer.PeerServer(resolve_generation_model(self.cfg.generate.model), self.cfg,
                                    a.out / "peer_server.log")
        t = time.perf_counter()
        await asyncio.to_thread(self.peer.start)
        self._closers.append(self.peer.stop)
        log(f"vLLM's OpenAI server up at {self.peer.base} in {time.perf_counter() - t:.0f} s")
        self.peer_client = httpx.AsyncClient(timeout=60)
        top_k = self.cfg.query.top_k
        if importable.get("langchain") and "langchain" in wanted:
            import bench_headline_langchain as lc

            recipe = lc.LangChainRecipe(chunks, embed_path, f"{self.peer.base}/v1", self.peer.name, self.redis.url,
                                        top_k, a.max_tokens)
            await asyncio.to_thread(recipe.build)
            self.systems["langchain"] = hs.LangChainSystem("langchain", self.peer, self.peer_client, recipe)
            self.notes.append(f"(c) langchain: {recipe.describe()}")
        if importable.get("llamaindex") and "llamaindex" in wanted:
            engine, _ = await asyncio.to_thread(peer.build_query_engine, chunks, embed_path, top_k, self.peer,
                                                a.max_tokens, self.cfg.generate.max_model_len)
            self.systems["llamaindex"] = hs.LlamaIndexSystem("llamaindex", self.peer, self.peer_client, engine)
            self.notes.append(f"(d) llamaindex: VectorStoreIndex + FaissVectorStore(IndexFlatIP) + "
                              f"HuggingFaceEmbedding, similarity_top_k {top_k}, OpenAILike(temperature=0, "
                              f"max_tokens={a.max_tokens}, max_retries=0)")

    async def stop(self) -> None:
        for c in ("client", "peer_client"):
            if getattr(self, c, None) is not None:
                await getattr(self, c).aclose()
        for close in reversed(self._closers):
            try:
                await asyncio.to_thread(close)
            except Exception as e:  # keep stopping the rest
                log(f"stopping: {type(e).__name__}: {e}")

    async def run(self, name: str, stream: list[Any], label: str, *, namespace: str | None = None,
                  stored: dict[str, str] | None = None) -> tuple[dict[str, Any], list[hr.Req]]:
        """One measured run of ``stream`` on a cold system; ``namespace``: keep the answers
        already cached under it (day mode), ``stored``: those answers, for the fidelity check."""
        system = self.systems[name]
        await system.prepare(namespace)
        # first-request costs (connections, lazy imports) outside the run, on a question no stream asks
        await system.ask("Which warm-up question does the headline benchmark ask first?")
        await system.prepare(namespace)
        redis = harness.process_tree(self.redis.proc.pid) if self.redis.proc is not None else set()
        sampler = CpuSampler(system_labels({*system.pids(), *redis}))
        g0, c0 = await system.generations(), sampler.snapshot()
        log(f"{label}: {len(stream)} requests")
        reqs, wall = await drive(system, stream, self.args)
        g1, c1 = await system.generations(), sampler.snapshot()
        cpu = {k: round(v, 2) for k, v in sampler.delta(c0, c1)["procs"].items() if k != OTHER}
        row = hr.summarize(label, reqs, wall, g1 - g0, sum(cpu.values()), stored, cache=system.cache)
        row["cpu_s_by_process"] = cpu
        log(f"{label}: {row['requests_per_s']:.2f} req/s, p95 {row['p95_ms']:.0f} ms, hit rate "
            f"{row['hit_rate']:.1%}, {row['generations']:.0f} generations for {row['distinct_questions']} "
            f"distinct, {row['errors']} errors")
        return row, reqs


async def main_async(args: argparse.Namespace) -> None:
    from ragserve.profiling.workload import zipf_stream

    bench = Bench(args)
    rows: list[dict[str, Any]] = []
    extra: list[str] = []
    requests: dict[str, list[hr.Req]] = {}
    try:
        await bench.start()
        order = [n for n in args.systems if n in bench.systems]
        if args.paraphrase is not None:
            p_rows, p_lines, p_requests = await headline_paraphrase.run_paraphrase(bench, args.s[0],
                                                                                   quality_lines)
            rows += p_rows
            extra += p_lines
            requests.update(p_requests)
        for s in args.s if args.paraphrase is None else ():
            stream = zipf_stream(bench.dataset.questions, args.n, s=s, seed=args.seed)
            suffix = f" s={s:g}" if len(args.s) > 1 else ""
            by_name: dict[str, tuple[dict[str, Any], list[hr.Req]]] = {}
            distinct = list({q.text: q for q in stream}.values())
            for name in order:
                by_name[name] = await bench.run(name, distinct if name == "ragserve-distinct" else stream,
                                                name + suffix)
                rows.append(by_name[name][0])
                requests[name + suffix] = by_name[name][1]
            extra += quality_lines(by_name, bench.golds, suffix)
            if not suffix:
                extra += hr.ratio_lines([r for r, _ in by_name.values()], ROLES)
            if args.days:
                day_rows, day_lines = await headline_days.run_days(bench, s, drive)
                rows += day_rows
                extra += ["", *day_lines]
    finally:
        await bench.stop()
    header = header_lines(args, bench)
    hr.write(args.out, header, rows, extra, {"title": f"{args.n} requests, Zipf s={args.s}, "
             f"{'open loop' if args.rate else f'C={args.concurrency}'}"
             f"{f', paraphrased p={args.paraphrase}' if args.paraphrase else ''}", "args": vars(args),
             "skipped": bench.skipped, "notes": bench.notes, "requests": requests})
    print("\n".join([*header, "", *hr.table(rows), "", *hr.miss_table(rows), "", *hr.cpu_table(rows), "", *extra]))
    log(f"report: {args.out / 'report.md'}")


def quality_lines(by_name: dict[str, Any], golds: dict[str, Any], suffix: str) -> list[str]:
    fresh = by_name.get("ragserve-nocache")
    out = []
    # a peer's answers come from another prompt: not comparable
    for name in ("ragserve", headline_paraphrase.SEMANTIC):
        if name in by_name and fresh is not None:
            q = hr.quality(by_name[name][1], fresh[1], golds)
            by_name[name][0]["quality"] = q
            if q["pairs"]:
                out.append(f"- contains-gold{suffix}, {name}'s cached answers vs ragserve-nocache's fresh answers "
                           f"on the same {q['pairs']} requests: {q['cached_contains_gold']:.3f} vs "
                           f"{q['fresh_contains_gold']:.3f} (± {q['stderr']:.3f})")
            if name == headline_paraphrase.SEMANTIC:  # the tier's own answers, apart from the exact hits
                q = hr.quality([r for r in by_name[name][1] if r.tier == "semantic"], fresh[1], golds)
                by_name[name][0]["quality_semantic"] = q
                if q["pairs"]:
                    out.append(f"- contains-gold{suffix}, {name}'s semantic hits vs ragserve-nocache's fresh "
                               f"answers on the same {q['pairs']} requests: {q['cached_contains_gold']:.3f} "
                               f"vs {q['fresh_contains_gold']:.3f} (± {q['stderr']:.3f})")
    return out


def header_lines(args: argparse.Namespace, bench: Bench) -> list[str]:
    loop = f"open loop at {args.rate:g} req/s (at most {args.max_open} in flight)" if args.rate else \
        f"closed loop, {args.concurrency} clients"
    lines = ["# Headline benchmark: a Zipf question stream through HTTP, ragserve and the recipes users copy", "",
             *harness.run_lines(bench.env),
             f"- stream: {args.n} requests, Zipf s={', '.join(f'{s:g}' for s in args.s)} over "
             f"{len(bench.dataset.questions)} questions of {args.questions.name} (ranking seed {args.seed}), {loop}",
             *paraphrase_lines(args),
             f"- generation: greedy, max_tokens {args.max_tokens}, the same model and engine settings everywhere; "
             "vLLM's prefix cache emptied and answer caches emptied before each system",
             *[f"- {n}" for n in bench.notes]]
    lines += [f"- {name}: skipped: {why}" for name, why in bench.skipped.items()]
    return lines


def paraphrase_lines(args: argparse.Namespace) -> list[str]:
    if args.paraphrase is None:
        return []
    ps = ", ".join(f"{p:g}" for p in args.paraphrase)
    return [f"- paraphrase: each repeat reworded with probability p in {{{ps}}} "
            "(ragserve.profiling.workload.paraphrase_repeats); "
            f"{headline_paraphrase.SEMANTIC}: a server started with [semantic] on, threshold "
            f"{args.semantic_threshold}, guard strict (the default), after the exact-only one stopped"]


def main(argv: list[str] | None = None) -> None:
    asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    main()
