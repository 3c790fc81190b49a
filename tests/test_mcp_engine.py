"""The MCP tools at ``/mcp`` over the real engine (the session's one vLLM engine), served by
a real uvicorn on loopback and called by the official ``mcp`` SDK's client."""

import asyncio

import pytest
from mcp import Client

from ragserve.server.app import create_app
from ragserve.server.common import source_json
from ragserve.testing.http import post, running

pytestmark = [pytest.mark.engine, pytest.mark.http]


def test_answer_and_retrieve_over_mcp_are_the_engines(rag, xquad_corpus):
    q = xquad_corpus[1][120]  # asked by no other test

    async def session(url):
        async with Client(f"{url}/mcp") as c:
            answered = await c.call_tool("answer", {"question": q["question"]})
            retrieved = await c.call_tool("retrieve", {"question": q["question"], "top_k": 5})
            return answered.structured_content, retrieved.structured_content

    with running(create_app(rag, rag.config)) as url:
        answered, retrieved = asyncio.run(session(url))
        raw = post(f"{url}/v1/query", json={"question": q["question"]}).json()
    assert answered["answer"].strip() and answered["model"] == "SmolLM2-135M-Instruct"
    assert answered["cache_tier"] == "miss"
    assert raw["cache_tier"] == "l1" and raw["answer"] == answered["answer"]
    assert q["doc_id"] in {s["doc_id"] for s in retrieved["sources"]}
    assert retrieved["sources"] == [source_json(s) for s in rag.retrieve(q["question"], 5)]
