"""The ``openai`` generator backend against vLLM's own OpenAI-compatible server, started here
(``python -m vllm.entrypoints.openai.api_server``, the default model, a small KV cache),
next to a dead URL: answers keep coming, the dead endpoint is skipped and counted, and a
stream the caller leaves early is aborted on the server (its running count returns to 0
and the request never finishes there)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from ragserve.cache.redis_server import free_port
from ragserve.config import RAGConfig
from ragserve.models.resolve import resolve_generation_model
from ragserve.rag import RAG
from ragserve.testing.waits import CLUSTER_WAIT_S, WAIT_S, aeventually
from ragserve.types import TokenEvent

from .conftest import load_benchmark

pytestmark = [pytest.mark.engine, pytest.mark.http]


def _peer_module():
    """``benchmarks/bench_serving_peer.py``: one launcher of vLLM's server for benchmarks and tests."""
    return load_benchmark("bench_serving_peer")


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    peer = _peer_module()
    cfg = RAGConfig().replace(vllm={"kv_cache_gib": 1})
    server = peer.PeerServer(resolve_generation_model(cfg.generate.model), cfg,
                             tmp_path_factory.mktemp("vllm") / "server.log")
    server.start(timeout_s=600)
    try:
        yield server
    finally:
        server.stop()


def metric(server, name: str, **labels: str) -> float:
    """One Prometheus sample of the server, summed over the label sets that match ``labels``."""
    total = 0.0
    for line in httpx.get(f"{server.base}/metrics", timeout=WAIT_S).text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def config(*urls: str, max_tokens: int = 24) -> RAGConfig:
    return RAGConfig().replace(generate={"backend": "openai", "max_tokens": max_tokens},
                               openai={"urls": list(urls), "probe_interval_s": 0.5, "connect_timeout_s": 1.0})


def test_answers_keep_coming_and_the_dead_endpoint_is_skipped(vllm_server, xquad_index, embedder, xquad_corpus):
    dead = f"http://127.0.0.1:{free_port()}"
    questions = [qa["question"] for qa in xquad_corpus[1][:4]]
    before = metric(vllm_server, "vllm:request_success_total")
    with RAG.from_index(xquad_index, config(dead, vllm_server.base), embedder=embedder) as rag:
        results = [rag.query(q) for q in questions]
        stats = rag.stats()["generator"]
    assert all(r.answer.strip() and r.cache_tier == "miss" for r in results)
    assert {r.model for r in results} == {vllm_server.name}
    assert all(r.timings.generate_first_token > 0 and r.usage.completion_tokens > 0 for r in results)
    by_url = {e["url"]: e for e in stats["endpoints"]}
    assert by_url[dead]["errors"] >= 1 and by_url[dead]["requests"] < len(questions)
    assert by_url[vllm_server.base]["errors"] == 0
    # every answer was generated once, on the live server
    assert metric(vllm_server, "vllm:request_success_total") - before == len(questions)


async def test_leaving_a_stream_early_aborts_it_on_the_server(vllm_server, xquad_index, embedder, xquad_corpus):
    question = xquad_corpus[1][5]["question"]
    finished = metric(vllm_server, "vllm:request_success_total")
    rag = await asyncio.to_thread(RAG.from_index, xquad_index, config(vllm_server.base, max_tokens=400),
                                  embedder=embedder)
    try:
        stream = rag.astream(question, cache_write=False)
        async for event in stream:
            if isinstance(event, TokenEvent):
                break  # the caller goes away after the first token
        await stream.aclose()
        # the abort reaches the server, which takes it in at its next step; max_tokens=400 keeps
        # the request from ending by itself sooner
        await aeventually(lambda: metric(vllm_server, "vllm:num_requests_running") == 0, CLUSTER_WAIT_S, 0.1,
                          "the server to drop the aborted request")
        assert rag.engine_unfinished() == 0
        # vLLM counts a request in request_success only when it ends by itself (stop, length):
        # gone from the running set without being counted, it was aborted.
        assert metric(vllm_server, "vllm:request_success_total") == finished
    finally:
        await asyncio.to_thread(rag.close)
