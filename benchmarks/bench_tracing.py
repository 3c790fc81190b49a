"""Tracing overhead (issue 25): what OpenTelemetry tracing at 100% sampling costs an L1 hit
and the miss path, against tracing off, in alternating blocks of one run on one ``RAG``
(tracing is an observer: on = added, off = removed; the spans go through the SDK's batch
processor to an exporter that drops them, so the export's own network cost is left out;
``--encode sdk`` first serializes each batch as OTLP protobuf with the SDK's encoder and
drops the bytes; ``--encode ragserve`` exports to ``observe/otlp.py``'s ``OTLPExporter``, what
``[telemetry] traces = "otlp"`` runs (spans written straight to protobuf, no SDK span made),
with only its HTTP send replaced by dropping the serialized request).

The miss path here is the fakes' (``ragserve.testing.fakes``: fake embedder, a generator
that answers at once): the pipeline's own work with no model, so the spans' cost is the
largest share it can be. With a real model a miss takes a second, and the same cost in
µs is a smaller share still. ``--engine`` measures that real miss path instead: the XQuAD
index (``--index``, built if missing), the real embedder and the default vLLM engine, each
block's misses distinct questions of XQuAD asked ``--concurrency`` at a time, the same ones
off and on (each mode in a cache namespace of its own, from a cold prefix cache). Prints
hardware and versions at the top.

Usage: python benchmarks/bench_tracing.py [--hits 20000] [--misses 2000] [--blocks 4] [--encode none]
       python benchmarks/bench_tracing.py --engine [--misses 96] [--blocks 4] [--max-tokens 16]
"""

from __future__ import annotations

import gc
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import harness
from harness import pcts
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from ragserve.observe.traces import make_tracing
from ragserve.testing.fakes import FakeGenerator, fake_rag


class Dropped(SpanExporter):
    def __init__(self, encode=None) -> None:  # type: ignore[no-untyped-def]
        self.spans, self.bytes, self.encode = 0, 0, encode

    def export(self, spans):  # type: ignore[no-untyped-def]
        self.spans += len(spans)
        if self.encode is not None:
            self.bytes += len(self.encode(spans))
        return SpanExportResult.SUCCESS


def encoder(name: str):  # type: ignore[no-untyped-def]
    if name == "sdk":
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        return lambda spans: encode_spans(spans).SerializePartialToString()
    return None


def exporter_for(name: str) -> SpanExporter:
    if name != "ragserve":
        return Dropped(encoder(name))
    from ragserve.observe.otlp import OTLPExporter, Payload

    class DroppedOTLP(OTLPExporter):
        """ragserve's OTLP exporter, the request it would send serialized and dropped."""

        spans = bytes = 0

        def _send(self) -> SpanExportResult:
            payload, self._payload = self._payload, Payload()
            self.spans += payload.spans
            self.bytes += len(payload.serialize())
            return SpanExportResult.SUCCESS

    return DroppedOTLP()


def hits(rag, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = rag.query("chunk number 1")
        out.append((time.perf_counter() - t0) * 1e6)
        assert r.cache_tier == "l1"
    return out


class GCClock:
    """Wall time spent in the garbage collector (all generations), from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.ns, self._start = 0, 0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter_ns()
        else:
            self.ns += time.perf_counter_ns() - self._start


GC = GCClock()


def misses(rag, n: int, block: int, tracing=None, questions=None,
           namespace=None) -> tuple[float, float, float]:
    """Requests/s, CPU µs per request (every thread of this process: the tracing thread's
    building and export included, flushed before the clocks stop; with ``--engine`` the
    engine core's own process is not in it) and the garbage collector's µs per request
    (part of the CPU). Each block starts from a full collection, outside its clocks: the
    collector's work left by earlier blocks (of either mode) is not charged to this one."""
    if questions is None:
        questions = [f"chunk number {i % 8} asked {block} {i}" for i in range(n)]
    if tracing is not None:
        tracing.flush()  # the block's L1 hits' spans are built and gone before the clocks start
    gc.collect()
    g0 = GC.ns
    t0, c0 = time.perf_counter(), time.process_time()
    results = rag.query_batch(questions, namespace=namespace)
    if tracing is not None:
        tracing.flush()
    elapsed, cpu, collecting = time.perf_counter() - t0, time.process_time() - c0, (GC.ns - g0) / 1e9
    wrong = [r if isinstance(r, Exception) else r.cache_tier for r in results
             if isinstance(r, Exception) or r.cache_tier != "miss"]
    assert not wrong, wrong[:3]
    return n / elapsed, cpu / n * 1e6, collecting / n * 1e6


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--hits", type=int, default=20_000)
    ap.add_argument("--misses", type=int, default=2_000)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--encode", choices=("none", "sdk", "ragserve"), default="none",
                    help="serialize the spans as OTLP protobuf (whose encoder) before dropping them")
    ap.add_argument("--engine", action="store_true",
                    help="the real miss path: the XQuAD index, the real embedder, the default vLLM engine")
    ap.add_argument("--index", type=Path, default=harness.XQUAD_INDEX,
                    help="--engine: the index (built if missing)")
    ap.add_argument("--max-tokens", type=int, default=16, help="--engine: tokens per answer")
    ap.add_argument("--concurrency", type=int, default=8, help="--engine: misses asked at once")
    args = ap.parse_args()
    if args.engine and args.misses == 2_000:
        args.misses = 96
    env = harness.environment("opentelemetry-sdk", gpu=False)
    with opened(args) as (rag, pool):
        exporter = exporter_for(args.encode)
        tracing = make_tracing(rag.config, exporter)
        rag.query("chunk number 1")
        hits(rag, 2000)  # warm
        rows: dict[str, dict[str, list]] = {m: {"hits": [], "misses": []} for m in ("off", "on")}
        for block in range(args.blocks):
            n = args.misses // args.blocks
            # --engine: both modes of a block ask the same questions, each in a namespace of its
            # own (so both miss) and from a cold prefix cache: the same prompts and, greedy, the
            # same generations; only tracing differs
            asked = None if pool is None else [pool.pop() for _ in range(n)]
            for mode in ("off", "on") if block % 2 == 0 else ("on", "off"):
                if mode == "on":
                    rag.observers.add(tracing)
                rows[mode]["hits"] += hits(rag, args.hits // args.blocks)
                traced, namespace = tracing if mode == "on" else None, None
                if pool is not None:
                    rag.reset_prefix_cache()
                    namespace = f"bench-tracing-{mode}-{block}"
                rows[mode]["misses"].append(
                    misses(rag, n, block * 2 + (mode == "on"), traced, asked, namespace))
                rag.observers.remove(tracing)
        tracing.flush()
    print("\n".join(harness.run_lines(env)))
    print(f"- spans exported (dropped) while on: {exporter.spans}; OTLP encoder: {args.encode}"
          f" ({exporter.bytes} bytes)\n")
    path = "real engine" if args.engine else "fakes"
    print(f"| tracing | L1 hit p50 µs | p99 µs | miss path ({path}) req/s, per block "
          "| CPU µs per miss (this process) | of which GC |")
    print("|---|---|---|---|---|---|")
    mean = {}
    for mode, r in rows.items():
        p50, p99 = pcts(r["hits"], 50, 99)
        rates, cpus = [m[0] for m in r["misses"]], [m[1] for m in r["misses"]]
        collecting = sum(m[2] for m in r["misses"]) / len(r["misses"])
        mean[mode] = (sum(rates) / len(rates), sum(cpus) / len(cpus))
        per_block = " / ".join(f"{x:.2f}" if args.engine else f"{x:.0f}" for x in rates)
        print(f"| {mode} | {p50:.1f} | {p99:.1f} | {per_block} | {mean[mode][1]:.0f} | {collecting:.0f} |")
    print(f"\nmiss throughput on/off: {mean['on'][0] / mean['off'][0]:.3f}; "
          f"CPU per miss on/off: {mean['on'][1] / mean['off'][1]:.3f}")


@contextmanager
def opened(args):  # type: ignore[no-untyped-def]
    """The ``RAG`` the run measures, and (``--engine``) the distinct questions its misses ask."""
    if not args.engine:
        with tempfile.TemporaryDirectory() as tmp, \
                fake_rag(tmp, FakeGenerator(delay=0.0), query={"max_in_flight": 64}) as rag:
            yield rag, None
        return
    import bench_serving_workload as wl

    from ragserve import RAG, RAGConfig
    from ragserve.cache.keys import normalize_question
    from ragserve.eval.datasets import load_dataset

    cfg = RAGConfig.load().replace(generate={"max_tokens": args.max_tokens},
                                   query={"max_in_flight": args.concurrency})
    print(f"- index: {wl.ensure_index(args.index, harness.XQUAD, cfg)}")
    # distinct as the cache keys them: two texts that normalise alike would be one answer
    by_key = {normalize_question(q.text): q.text for q in load_dataset(harness.XQUAD).questions}
    questions = list(by_key.values())
    random.Random(0).shuffle(questions)  # not an article's questions, sharing sources, in one block
    need = args.misses + 1  # --misses, asked in each mode, and the hits' question
    if len(questions) < need:
        raise SystemExit(f"--misses {args.misses}: XQuAD has {len(questions)} distinct questions")
    with RAG.from_index(args.index, cfg) as rag:
        yield rag, questions[1:need][::-1]


if __name__ == "__main__":
    main()
