"""The systems of ``bench_headline.py``, behind one interface:

- ``prepare()``: an empty answer cache and an emptied vLLM prefix cache, so every system
  starts its run from the same cold state;
- ``ask(question) -> (answer, tier)`` or ``(answer, tier, match)``: one request as a client
  sends it (tiers and ``match`` as in ``headline_report.Req``); an error raises;
- ``generations()``: requests the system's vLLM engine has finished so far (its own
  counter: a delta over a run is the generations that run cost);
- ``pids()``: the processes that serve it (for CPU-seconds per request).

(a)/(b) are ``ragserve serve`` over HTTP (native API) with the answer cache on or off, on
the same server: (b) turns the cache off per request. ``--paraphrase`` adds (a) on a
server started with ``[semantic]`` on (the tier is a server setting, not a request's).
(c) is the LangChain recipe (``bench_headline_langchain.py``) and (d) the LlamaIndex peer
of ``bench_serving_peer.py``, both on vLLM's OpenAI server with the same engine settings.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import harness
import httpx


class RagserveHttp:
    """``POST /v1/query`` (JSON, not streamed: the peers' clients wait for whole answers too)."""

    def __init__(self, name: str, server: Any, client: httpx.AsyncClient, admin_key: str, *, cache: bool) -> None:
        self.name, self.server, self.client, self.admin_key, self.cache = name, server, client, admin_key, cache
        self.namespace = ""

    async def prepare(self, namespace: str | None = None) -> None:
        """A new cache namespace (cold L1 and L2: the key includes it), or ``namespace`` to
        reuse answers stored under it (day mode); then an emptied prefix cache."""
        self.namespace = namespace or f"headline-{uuid.uuid4().hex[:8]}"
        await harness.reset_prefix_cache(self.client, admin_key=self.admin_key, what="ragserve")

    async def ask(self, question: str) -> tuple[str, str, str | None]:
        from ragserve.cache.keys import normalize_question

        body = {"question": question, "namespace": self.namespace,
                "cache": {"read": self.cache, "write": self.cache}}
        d = await harness.post_ok(self.client, "/v1/query", body)
        match = d.get("semantic_match")
        return (d["answer"], "shared" if d.get("shared") else d["cache_tier"],
                None if match is None else normalize_question(match))

    async def generations(self) -> float:
        r = await self.client.get("/v1/stats")
        r.raise_for_status()
        return float(r.json()["generator"]["engine"]["finished"])

    def pids(self) -> set[int]:
        return harness.process_tree(self.server.pid)


class _OnPeerServer:
    """A system answering through vLLM's OpenAI server (``bench_serving_peer.PeerServer``)."""

    cache = False

    def __init__(self, name: str, server: Any, client: httpx.AsyncClient) -> None:
        self.name, self.server, self.client = name, server, client

    async def prepare(self, namespace: str | None = None) -> None:
        await self.server.reset_prefix_cache(self.client)

    async def generations(self) -> float:
        return float((await self.server.metrics(self.client)).get("vllm:request_success_total", 0.0))

    def pids(self) -> set[int]:
        return self.server.pids()


class LangChainSystem(_OnPeerServer):
    """(c): the LangChain recipe with LangChain's Redis LLM cache on the benchmark's Redis."""

    cache = True

    def __init__(self, name: str, server: Any, client: httpx.AsyncClient, recipe: Any) -> None:
        super().__init__(name, server, client)
        self.recipe = recipe

    async def prepare(self, namespace: str | None = None) -> None:
        if namespace is None:
            await asyncio.to_thread(self.recipe.clear_cache)
        await super().prepare(namespace)

    async def ask(self, question: str) -> tuple[str, str]:
        answer, hit = await self.recipe.ask(question)
        return answer, "cache" if hit else "miss"


class LlamaIndexSystem(_OnPeerServer):
    """(d): LlamaIndex's query engine, no answer cache."""

    def __init__(self, name: str, server: Any, client: httpx.AsyncClient, query_engine: Any) -> None:
        super().__init__(name, server, client)
        self.query_engine = query_engine

    async def ask(self, question: str) -> tuple[str, str]:
        resp = await self.query_engine.aquery(question)
        return str(resp.response or "").strip(), "miss"
