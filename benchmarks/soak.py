"""Soak run of ``ragserve serve`` (issues 11 and 16): a long, bounded, mixed workload with
the server's memory and open file descriptors sampled, and every response checked.

What it sends, from ``--concurrency`` workers for ``--minutes`` (the mix is ``--mix``):

- ``hit``: a question from a small hot set, asked once before the run (L1 hits);
- ``miss``: a question with ``cache: {read: false}`` (a real generation every time);
- ``stream`` / ``chat``: ``/v1/query`` and ``/v1/chat/completions`` as Server-Sent
  Events, read to the end (the last event must be ``done`` / ``[DONE]``);
- ``cancel``: a stream (native or chat) the client leaves after its first token, or a
  plain query it gives up on after 0.3 s: the server must abort the vLLM request;
- ``deadline``: ``timeout_s`` of 0.05 s with the cache off: 504 (200 if it beat it);
- ``bad``: empty, blank, lone surrogate (``"\\ud800"`` in the JSON), control character,
  too long, body over the limit, malformed JSON, wrong types, unknown fields, refused
  chat options: the 4xx named for each, with ``{"error": {"type", "message", "stage"}}``;
- ``retrieve``: ``/v1/retrieve``.

At most ``--max-generating`` workers (default: half) are in a generating kind (miss,
stream, chat, cancel) at once; the others then send the fast kinds, so hits, refusals and
retrievals keep flowing while the engine is saturated. Generating kinds take turns by
weight (a short run on a slow machine still sends each of them).

A response is *unexpected* when its status is not the one its request must get, an error
body is not the typed error JSON (or names another error type), or a 200 stream ends in
an error or without its last event. A 500 is always a bug. Native requests use their own
cache namespace, so answers cached before the run cannot turn its misses into hits.

Sampled every ``--sample-s`` seconds with psutil: the server process's RSS and open fds,
and its child processes' RSS (the vLLM engine core; the embedded Redis apart); from
``/metrics``, the requests the vLLM engine holds; from ``/v1/stats``, the bytes and entries
of the L1 answer cache. Reported: one markdown row per minute (requests by kind with
p50/p99 latency, outcomes, RSS, fds), the outcomes of the whole run, and a summary: RSS
growth from the end of the warm-up to the end of the run, as it is and net of what L1 grew
by (a cache bounded by ``cache.l1_max_bytes`` filling up is not a leak), and its pace in
the first and the second half of that time (a cache filling up slows down, a leak keeps
its pace); fd growth idle-to-idle (after priming, after the run), requests still in flight
on the server and held by vLLM after the run (abandoned and timed-out requests must have
been aborted), 500s and unexpected statuses.

Why the warm-up is minutes long (``--warmup-s``, default 3 minutes, or half a shorter run):
the server's own memory grows while its embedding model meets new input shapes. Under
bfloat16 autocast on a CPU, torch/oneDNN keeps state per (batch size, padded length) it
has run (compiled primitives, buffers): embedding one question at a time, RSS rises 82 MB
and levels off once every question length has been seen; in batches of 1 to 16, it rises
470 MB over 26,000 questions, slowing down. A soak keeps meeting rarer shapes for minutes:
the 10-minute run on the real engine grew +23, +22, +7, +11, +13, +1, +4, +4, +1 MB in its
minutes 2 to 10 (+86 MB from minute 1; from minute 3, +41 MB, at 9 then 3 MB/min). The
HTTP layer and the pipeline hold no more than their bounded caches: ``--fake-generator``
(the same server over a stand-in generator, no vLLM; ``--fake-embedder`` too) grew 7 MB in
2 minutes at 125 requests/s with a stand-in embedder, and tracemalloc found the Python
heap's growth (3.5 MB in 70 s) in L1 entries and the 10,000-query stats
window. (Measured 2026-11-29 with ``scripts/fake_serve.py``; see its docstring.)

By default it starts ``ragserve serve INDEX`` itself on 127.0.0.1 (port 0, its own
``RAGSERVE_HOME`` in a temp dir, so its embedded Redis starts empty), and stops it with
SIGTERM at the end (it must drain and exit 0). ``--url`` drives a server already running
on this machine instead (``--pid`` to sample it). Exit status 1 on any 500, unexpected
response, request left in flight or in vLLM, server exit other than 0 or, with
``--max-rss-growth-mb``, more growth than that after the warm-up, net of L1.

Run (from the repo root; the index is built from XQuAD into ``indexes/xquad`` if missing):

    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false .venv/bin/python benchmarks/soak.py \\
        --minutes 10 --concurrency 16 --max-rss-growth-mb 50 --out reports/soak.md
    .venv/bin/python benchmarks/soak.py --minutes 1 --concurrency 8   # a quick look

The driver (``run``, ``report``) is what ``tests/test_soak.py`` runs for ~40 s in CI. What
it sends and how it checks each response is ``soak_traffic.py``; what it measured and the
report, ``soak_report.py``; the server it drives, ``soak_server.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import harness
import httpx
from soak_report import MB, Result, Sample, failures, report
from soak_server import Sampler, engine_held, l1_size, settled, start_server, stop_server, wait_ready
from soak_traffic import DEFAULT_MIX, KINDS, SLOW, Record, Settings, Traffic, perform

from ragserve.profiling.env import header_markdown

__all__ = ["KINDS", "SLOW", "Record", "Result", "Sample", "Settings", "failures", "main", "report", "run"]
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


# -- the run -------------------------------------------------------------------------------


async def run(url: str, questions: Sequence[str], s: Settings, pid: int | None = None,
              log: Callable[[str], None] = print) -> Result:
    """Drive ``url`` with the mixed workload of ``s``; sample process ``pid`` (the server)."""
    if not s.namespace:
        s = dataclasses.replace(s, namespace=f"soak-{uuid.uuid4().hex[:12]}")
    traffic = Traffic(questions, s)
    sampler = Sampler(pid)
    records: list[Record] = []
    samples: list[Sample] = []
    async with harness.http_client(url, timeout=s.request_timeout_s, connections=2 * s.concurrency) as client:
        await wait_ready(client)
        t = time.perf_counter()
        primed = await asyncio.gather(*(client.post("/v1/query", json=traffic.query(q)) for q in traffic.hot))
        bad = [r.status_code for r in primed if r.status_code != 200]
        if bad:
            raise RuntimeError(f"priming the hot set failed: statuses {bad}")
        log(f"hot set of {len(traffic.hot)} primed in {time.perf_counter() - t:.1f} s; "
            f"namespace {s.namespace}; running {s.duration_s:.0f} s at concurrency {s.concurrency}, at most "
            f"{s.max_generating or max(1, s.concurrency // 2)} of them generating")
    await asyncio.sleep(1.0)  # the primer's connections closed
    before = sampler.sample(0.0)
    t0 = time.perf_counter()
    stop_at = t0 + s.duration_s
    counter = iter(range(s.max_requests))

    held: list[tuple[float, int]] = []
    l1: list[tuple[float, int, int]] = []

    async def sample_loop() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as metrics:
            while True:
                t = time.perf_counter() - t0
                got = sampler.sample(t)
                if got is not None:
                    samples.append(got)
                n = await engine_held(metrics)
                if n is not None:
                    held.append((t, n))
                cache = await l1_size(metrics)
                if cache is not None:
                    l1.append((t, *cache))
                await asyncio.sleep(s.sample_s)

    slow_slots = s.max_generating or max(1, s.concurrency // 2)
    generating = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal generating
        while time.perf_counter() < stop_at:
            n = next(counter, None)
            if n is None:
                return
            call = traffic.next(fast_only=generating >= slow_slots)
            slow = call.kind in SLOW
            generating += slow
            try:
                records.append(await perform(client, call, t0, f"soak-{n}"))
            finally:
                generating -= slow
            if s.think_s:
                await asyncio.sleep(s.think_s)

    async def progress() -> None:
        shown = 0
        while True:
            await asyncio.sleep(s.period_s)
            rows = records[shown:]
            shown += len(rows)
            last = samples[-1] if samples else None
            mem = f"; RSS server {last.rss_server / MB:.0f} MB, engine {last.rss_engine / MB:.0f} MB, " \
                  f"fds {last.fds}" if last else ""
            log(f"  {time.perf_counter() - t0:5.0f} s: {len(rows)} requests, {sum(not r.expected for r in rows)} "
                f"unexpected, {sum(r.status == 500 for r in rows)} × 500{mem}")

    background = [asyncio.ensure_future(sample_loop()), asyncio.ensure_future(progress())]
    try:
        async with harness.http_client(url, timeout=s.request_timeout_s, connections=2 * s.concurrency) as client:
            await asyncio.gather(*(worker(client) for _ in range(s.concurrency)))
            last = sampler.sample(time.perf_counter() - t0)  # the end of the run, still under its last load
            if last is not None:
                samples.append(last)
    finally:
        for task in background:
            task.cancel()
    wall = time.perf_counter() - t0
    in_flight, held_after = await settled(url)
    await asyncio.sleep(1.0)
    after = sampler.sample(time.perf_counter() - t0)
    return Result(s, url, records, samples, before, after, in_flight, wall, held, held_after, l1)


# -- the script: a server of its own, the run, SIGTERM ----------------------------------------


def parse_mix(text: str) -> dict[str, float]:
    mix = dict(DEFAULT_MIX)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in KINDS or not weight:
            raise argparse.ArgumentTypeError(f"--mix: {part!r} is not KIND=WEIGHT with KIND in {', '.join(KINDS)}")
        mix[name] = float(weight)
    return mix


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = harness.parser(__doc__)
    ap.add_argument("--url", help="drive this running server (loopback only) instead of starting one")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, to sample its RSS and fds")
    ap.add_argument("--index", type=Path, default=harness.XQUAD_INDEX,
                    help="index to serve (built from all XQuAD paragraphs if missing)")
    ap.add_argument("--xquad", type=Path, default=harness.XQUAD)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-generating", type=int, default=0,
                    help="workers in a generating kind at once (default: half); the rest send fast kinds")
    ap.add_argument("--mix", type=parse_mix, default=dict(DEFAULT_MIX),
                    help=f"weights per kind, e.g. 'hit=50,bad=5' (default {DEFAULT_MIX})")
    ap.add_argument("--hot", type=int, default=8, help="questions in the hot set (cache hits)")
    ap.add_argument("--think-ms", type=float, default=50.0, help="pause of each worker between requests")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--warmup-s", type=float, help="RSS growth is counted from here (default: the first three "
                    "minutes, or half the run if it is shorter than six; see above)")
    ap.add_argument("--max-requests", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=32, help="generate.max_tokens of the server started here")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="vllm.kv_cache_gib of the server")
    ap.add_argument("--grace", type=float, default=30.0, help="the server's drain grace after SIGTERM")
    ap.add_argument("--max-rss-growth-mb", type=float, help="fail if the server's RSS grows more (issue 11: 50)")
    ap.add_argument("--fake-generator", action="store_true",
                    help="FOR INVESTIGATING THE HTTP LAYER'S MEMORY: serve with scripts/fake_serve.py (a stand-in "
                    "generator, the real embedding model, no vLLM); its RSS says nothing about vLLM's")
    ap.add_argument("--fake-embedder", action="store_true", help="with --fake-generator: a stand-in embedder too")
    ap.add_argument("--fake-step-ms", type=float, default=20.0, help="with --fake-generator: ms per generated piece")
    ap.add_argument("--out", type=Path, help="also write the report here (markdown)")
    args = ap.parse_args(argv)
    if args.fake_embedder and not args.fake_generator:
        ap.error("--fake-embedder goes with --fake-generator")
    if args.url and httpx.URL(args.url).host not in LOOPBACK:
        ap.error(f"--url must be a loopback address ({', '.join(LOOPBACK)}): a soak is not for other machines")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import bench_serving_workload as wl

    from ragserve.config import RAGConfig

    env = harness.environment()  # before the run: its load average is the machine's, not ours
    questions = [q.text for q in wl.load_questions(args.xquad)]
    random.Random(args.seed).shuffle(questions)
    s = Settings(duration_s=args.minutes * 60, concurrency=args.concurrency, max_generating=args.max_generating,
                 mix=args.mix, hot=args.hot, think_s=args.think_ms / 1e3,
                 warmup_s=args.warmup_s or min(180.0, args.minutes * 30), sample_s=args.sample_s,
                 max_requests=args.max_requests, seed=args.seed)
    settings = {"minutes": f"{args.minutes:g}", "concurrency": s.concurrency,
                "generating at most": s.max_generating or max(1, s.concurrency // 2),
                "think time": f"{args.think_ms:g} ms",
                "mix (weights)": ", ".join(f"{k} {w:g}" for k, w in s.mix.items() if w),
                "hot set": s.hot, "questions": f"{len(questions)} distinct XQuAD questions",
                "sampled every": f"{s.sample_s:g} s", "warm-up": f"{s.warmup_s:g} s"}
    proc = log_path = None
    with tempfile.TemporaryDirectory(prefix="ragserve-soak-") as tmp:
        if args.url:
            url, pid = args.url.rstrip("/"), args.pid
            settings["server"] = f"{url} (running; pid {pid or 'not given: no sampling'})"
        else:
            note = wl.ensure_index(args.index, args.xquad, RAGConfig.load())
            proc, url, log_path = start_server(args.index, Path(tmp), args)
            pid = proc.pid
            what = ("`fake_serve.py` (STAND-IN generator, " + ("stand-in" if args.fake_embedder else "real")
                    + " embedder: for the HTTP layer's memory, not vLLM's)") if args.fake_generator else "`ragserve serve`"
            settings.update({"server": f"{what} pid {pid} at {url}; its own RAGSERVE_HOME (empty Redis)",
                             "index": note, "generate": f"max_tokens {args.max_tokens}, KV cache "
                             f"{args.kv_cache_gib:g} GiB", "drain grace": f"{args.grace:g} s"})
        print(f"# Soak: {args.minutes:g} min of mixed traffic against ragserve serve\n", flush=True)
        print(header_markdown(env, settings), flush=True)
        try:
            res = asyncio.run(run(url, questions, s, pid, log=lambda m: print(m, flush=True)))
        finally:
            if proc is not None and proc.poll() is None and sys.exc_info()[0] is not None:
                proc.kill()
        text = report(res)
        why = failures(res, args.max_rss_growth_mb)
        if proc is not None:
            status, took = stop_server(proc, args.grace)
            shown = status if status is not None else "none (killed)"
            text += f"\n- **SIGTERM**: the server exited with status {shown} after {took:.1f} s"
            if status != 0:
                why.append(f"the server exited with {status} after SIGTERM")
        text += f"\n\n**{'FAILED: ' + '; '.join(why) if why else 'PASSED'}**\n"
        print("\n" + text, flush=True)
        if log_path is not None and why:
            print(f"\nLast lines of the server's log:\n```\n{harness.tail(log_path)}\n```", flush=True)
        harness.write_report(f"# Soak\n\n{header_markdown(env, settings)}\n{text}", args.out, echo=False)
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
