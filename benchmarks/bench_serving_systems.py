"""The systems ``bench_serving.py`` compares, behind one ``run(name, questions, C)``:
ragserve (``aquery``), its sequential ``query`` loop, raw vLLM on ragserve's own engine
and prompts, and the LlamaIndex peer. Also the embedding micro-batching measurement."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from bench_serving_report import Record
from bench_serving_workload import Question, Workload
from harness import pct, process_name


class Systems:
    def __init__(self, args: Any, cfg: Any, workload: Workload, log: Any) -> None:
        self.args, self.cfg, self.workload, self.log = args, cfg, workload, log
        self.rag: Any = None
        self.engine: Any = None
        self.engine_loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None
        self.query_engine: Any = None
        self.http: Any = None
        self.available: list[str] = []
        self.prompts: dict[str, str] = {}
        self.used_ids: dict[str, list[int]] = {}
        self.retrieved_ids: dict[str, list[int]] = {}
        self.start_s: dict[str, float] = {}
        self.n_chunks = 0
        self.embed_path = self.gen_path = ""
        self.peer_note = "not started"
        self.peer_skipped: str | None = None
        self.identity = {"requests": 0, "same_question": 0, "same_chunks": 0}
        self.server_requests: list[tuple[str, int, int]] = []
        self._labels: dict[int, str] = {}

    # -- start / stop ---------------------------------------------------------------------

    async def start(self) -> None:
        from ragserve import RAG
        from ragserve.models.resolve import resolve_embedding_model, resolve_generation_model

        self.embed_path = resolve_embedding_model(self.cfg.embed.model)
        self.gen_path = resolve_generation_model(self.cfg.generate.model)
        t = time.perf_counter()
        self.rag = await asyncio.to_thread(RAG.from_index, self.args.index, self.cfg)
        self.start_s["ragserve"] = time.perf_counter() - t
        self.engine = self.rag.generator.engine
        await asyncio.to_thread(self.rag.query, self.workload.warmup[0].text)  # starts vLLM's output handler
        self.engine_loop = _engine_loop(self.rag, self.engine)
        self.available += ["ragserve", "raw vLLM"]
        await asyncio.to_thread(self._precompute_prompts)
        chunks = self.rag.docstore.get_many(list(range(len(self.rag.docstore))))
        self.n_chunks = len(chunks)
        self.log(f"ragserve up in {self.start_s['ragserve']:.0f} s; {len(self.prompts)} prompts precomputed")
        if self.args.skip_peer:
            self.peer_skipped = "--skip-peer"
        else:
            await self._start_peer(chunks)
        if self.peer_skipped:
            self.peer_note = f"not measured ({self.peer_skipped})"

    def _precompute_prompts(self) -> None:
        # Exactly ragserve's retrieval and prompt assembly, once per question, outside any
        # timed run: raw vLLM then receives the byte-identical prompt ragserve would send.
        builder = self.rag.prompt_builder()
        for q in [*self.workload.warmup, *(q for qs in self.workload.levels.values() for q in qs)]:
            sources = self.rag.retrieve(q.text)
            prompt = builder.build(q.text, sources)
            self.prompts[q.text] = prompt.text
            self.used_ids[q.text] = [s.chunk_id for s in prompt.used]
            self.retrieved_ids[q.text] = [s.chunk_id for s in sources]

    async def _start_peer(self, chunks: list[Any]) -> None:
        overlay = self.args.peer_overlay
        if overlay.is_dir():
            sys.path.append(str(overlay))  # appended: the venv's own packages always win
        try:
            import bench_serving_peer as peer
            import llama_index.embeddings.huggingface  # noqa: F401
            import llama_index.llms.openai_like  # noqa: F401
            import llama_index.vector_stores.faiss  # noqa: F401
        except ImportError as e:
            self.peer_skipped = f"its packages are not importable ({e}); `make bench-deps` installs them"
            self.log(f"peer skipped: {self.peer_skipped}")
            return
        self.server = peer.PeerServer(self.gen_path, self.cfg, self.args.out / "peer_server.log",
                                      matched_env=not self.args.peer_vllm_defaults)
        self.log(f"starting the peer's vLLM OpenAI server on {self.server.base}")
        await asyncio.to_thread(self.server.start)
        self.start_s["peer"] = self.server.start_s
        import httpx

        self.http = httpx.AsyncClient(timeout=60)
        self.query_engine, _ = await asyncio.to_thread(
            peer.build_query_engine, chunks, self.embed_path, self.cfg.query.top_k, self.server,
            self.args.max_tokens, self.cfg.generate.max_model_len)
        self._peer = peer
        self.available.append("LlamaIndex")
        argv = " ".join(Path(a).name if "/" in a else a for a in self.server.argv[1:])
        layout = "vLLM's default process layout" if self.args.peer_vllm_defaults else "ragserve's engine settings"
        self.peer_note = (f"LlamaIndex VectorStoreIndex + FaissVectorStore(IndexFlatIP) + HuggingFaceEmbedding"
                          f"(local MiniLM folder) over ragserve's {len(chunks)} chunks, similarity_top_k "
                          f"{self.cfg.query.top_k}, OpenAILike(is_chat_model=True, "
                          f"max_tokens={self.args.max_tokens}, temperature=0, max_retries=0) → `{argv}` "
                          f"with {layout}; server log in peer_server.log")
        self.log(f"peer up in {self.server.start_s:.0f} s")

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
        if self.rag is not None:
            await asyncio.to_thread(self.rag.close)

    # -- one system, one run ----------------------------------------------------------------

    async def run(self, name: str, qs: list[Question], c: int, drive: Any,
                  timeout_s: float) -> tuple[list[Record], float]:
        if name == "ragserve":
            return await drive(qs, c, self._ragserve_one, timeout_s)
        if name == "sequential":
            return await asyncio.to_thread(self._sequential, qs)
        if name == "raw vLLM":
            # AsyncLLM belongs to the loop it was started on: drive it from that loop.
            fut = asyncio.run_coroutine_threadsafe(drive(qs, c, self._raw_one, timeout_s), self.engine_loop)
            return await asyncio.wrap_future(fut)
        if name == "LlamaIndex":
            return await drive(qs, c, self._peer_one, timeout_s)
        raise ValueError(name)

    def _ragserve_record(self, i: int, q: Question, r: Any) -> Record:
        ids = [s.chunk_id for s in r.sources]
        self.identity["requests"] += 1
        self.identity["same_question"] += r.question == q.text
        self.identity["same_chunks"] += ids == self.used_ids.get(q.text)
        return Record.of_result(i, r, chunk_ids=ids)

    async def _ragserve_one(self, i: int, q: Question) -> Record:
        return self._ragserve_record(i, q, await self.rag.aquery(q.text))

    def _sequential(self, qs: list[Question]) -> tuple[list[Record], float]:
        out = []
        t0 = time.perf_counter()
        for i, q in enumerate(qs):
            t = time.perf_counter()
            try:
                rec = self._ragserve_record(i, q, self.rag.query(q.text))
            except Exception as e:  # noqa: BLE001 - reported, like drive() does
                rec = Record(i, error=f"{type(e).__name__}: {e}"[:200])
            rec.latency_s = time.perf_counter() - t
            out.append(rec)
        return out, time.perf_counter() - t0

    async def _raw_one(self, i: int, q: Question) -> Record:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        g = self.rag.generator.config
        # The sampling ragserve's VllmGenerator uses (greedy; final output only).
        params = SamplingParams(max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in self.engine.generate(self.prompts[q.text], params, f"raw-{uuid.uuid4().hex}"):
            final = out
        if final is None or not final.outputs:
            raise RuntimeError("vLLM returned no output")
        o, m = final.outputs[0], final.metrics
        stages = {}
        if m is not None and getattr(m, "scheduled_ts", 0):
            stages = {"generate_queue": max(m.scheduled_ts - m.queued_ts, 0) * 1e3,
                      "generate_first_token": max(m.first_token_ts - m.scheduled_ts, 0) * 1e3,
                      "generate_decode": max(m.last_token_ts - m.first_token_ts, 0) * 1e3}
        return Record(i, answer=o.text.strip(), completion_tokens=len(o.token_ids),
                      prompt_tokens=len(final.prompt_token_ids or []), stages=stages)

    async def _peer_one(self, i: int, q: Question) -> Record:
        resp = await self.query_engine.aquery(q.text)
        ids = [int(n.node.node_id.split("-", 1)[1]) for n in resp.source_nodes]
        return Record(i, answer=str(resp.response or "").strip(), chunk_ids=ids)

    # -- fairness and accounting --------------------------------------------------------------

    async def reset_prefix_cache(self, name: str) -> None:
        if name == "LlamaIndex":
            await self.server.reset_prefix_cache(self.http)
            return

        async def reset() -> None:
            for _ in range(50):  # fails while a just-finished request still holds blocks
                if await self.engine.reset_prefix_cache():
                    return
                await asyncio.sleep(0.1)
            raise RuntimeError("vLLM refused to reset its prefix cache 50 times")

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(reset(), self.engine_loop))

    async def server_metrics(self, name: str) -> dict[str, float] | None:
        return await self.server.metrics(self.http) if name == "LlamaIndex" else None

    def metric_deltas(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return self._peer.metric_deltas(before, after)

    def overlap(self, name: str, qs: list[Question], records: list[Record]) -> float | None:
        """Share of ragserve's top-k chunks the peer retrieved too (same chunks, same model)."""
        if name != "LlamaIndex":
            return None
        vals = []
        for r in records:
            ours = self.retrieved_ids.get(qs[r.question].text)
            if ours and not r.error:
                vals.append(len(set(r.chunk_ids) & set(ours)) / len(ours))
        return float(np.mean(vals)) if vals else None

    def label_pid(self, pid: int) -> str:
        if pid not in self._labels:
            peer = self.server.pids() if self.server is not None else set()
            name = process_name(pid)
            if pid == os.getpid():
                label = "bench process (clients, ragserve pipeline, vLLM client)"
            elif self.server is not None and pid == self.server.proc.pid:
                label = "peer: vLLM API server"
            elif pid in peer:
                label = f"peer: {name}"
            else:
                label = f"ragserve: {name}" if "Engine" in name else name
            self._labels[pid] = label
        return self._labels[pid]

    def check_lines(self, runs: list[Any]) -> list[str]:
        n = self.identity
        lines = [f"- ragserve requests that asked the same normalised question the raw-vLLM prompts were built "
                 f"from: {n['same_question']}/{n['requests']}; that put the same chunks in the prompt: "
                 f"{n['same_chunks']}/{n['requests']}."]
        for r in runs:
            if r.server_stats:
                ok = sum(not x.error for x in r.records)
                lines.append(f"- LlamaIndex C={r.concurrency}: the server counted "
                             f"{r.server_stats['requests']:.0f} "
                             f"finished requests for {ok} answered at the client; top-{self.cfg.query.top_k} "
                             f"chunks shared with ragserve's retrieval: {r.retrieval_overlap:.0%}.")
        return lines


def _engine_loop(rag: Any, engine: Any) -> asyncio.AbstractEventLoop:
    """The loop vLLM's AsyncLLM lives on: its output handler task runs there."""
    handler = getattr(engine, "output_handler", None)
    if handler is not None:
        return handler.get_loop()
    async def running() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    return rag.call(running())  # ragserve's engine loop, if vLLM's internals change


async def embed_bench(index: Path, cfg: Any, questions: list[Question], n: int, drive: Any, log: Any,
                      concurrency: int = 32) -> dict[str, Any]:
    """32 concurrent ``rag.aretrieve`` with ``embed.max_batch`` at its default vs 1."""
    from ragserve import RAG, EmbedConfig

    names = {f.name for f in fields(EmbedConfig)}
    missing = [f"EmbedConfig.{f}" for f in ("batch_window_ms", "max_batch") if f not in names]
    missing += [] if hasattr(RAG, "aretrieve") else ["RAG.aretrieve"]
    if missing:
        msg = f"this checkout has no {', '.join(missing)} (issue 4's micro-batcher is not merged here yet)"
        log(f"embedding batching skipped: {msg}")
        return {"skipped": msg}
    e = cfg.embed
    settings = {f"micro-batched (max_batch {e.max_batch}, window {e.batch_window_ms:g} ms)": e.max_batch,
                "one model call per query (max_batch 1)": 1}
    texts = [q.text for q in questions][:n]
    rags: dict[str, Any] = {}
    got: dict[str, tuple[list[float], float]] = {label: ([], 0.0) for label in settings}

    async def one(rag: Any, i: int, text: str) -> Record:
        sources = await rag.aretrieve(text)
        if not sources:
            raise RuntimeError("no sources")
        return Record(i, chunk_ids=[s.chunk_id for s in sources])

    try:
        for label, mb in settings.items():
            rags[label] = await asyncio.to_thread(RAG.from_index, index, cfg.replace(embed={"max_batch": mb}),
                                                  start_engine=False)
        labels = list(settings)
        for order in (labels, labels[::-1]):  # alternate, so neither always runs first
            for label in order:
                rag = rags[label]
                await drive(texts[:concurrency], concurrency, lambda i, t, rag=rag: one(rag, i, t), 120)
                recs, wall = await drive(texts, concurrency, lambda i, t, rag=rag: one(rag, i, t), 120)
                lat, total = got[label]
                got[label] = (lat + [r.latency_s * 1e3 for r in recs if not r.error], total + wall)
    finally:
        for rag in rags.values():
            await asyncio.to_thread(rag.close)
    out = {label: {"n": len(lat), "rate": len(lat) / wall, "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95)}
           for label, (lat, wall) in got.items()}
    on, off = (out[label]["rate"] for label in settings)
    log(f"embedding: {on:.1f} vs {off:.1f} retrievals/s ({on / off:.2f}x)")
    return {"concurrency": concurrency, "settings": out, "ratio": on / off}
