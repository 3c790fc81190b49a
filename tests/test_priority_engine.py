"""Priority classes on the real vLLM engine: an urgent request overtakes a queued flood in
ragserve's admission queue and then in vLLM's own (``generate.scheduling = "priority"``).

An engine of its own (the session's runs first come, first served, and a queue must form
inside vLLM): ``vllm.max_num_seqs = 1``, so vLLM runs one request at a time and holds the
rest in its waiting queue; ``query.max_in_flight = 8``, so ragserve holds what is past that.
The unit tests of the queue itself (fakes): tests/test_priority.py."""

import asyncio

import pytest

from ragserve import RAG, RAGConfig
from ragserve.testing.waits import WAIT_S, aeventually

pytestmark = [pytest.mark.engine]

FLOOD = 33


@pytest.fixture(scope="module")
def priority_rag(xquad_index, embedder):
    cfg = RAGConfig().replace(
        cache={"enabled": False}, query={"top_k": 1, "max_in_flight": 8, "max_queued": 64},
        generate={"max_tokens": 4, "scheduling": "priority"}, vllm={"kv_cache_gib": 1, "max_num_seqs": 1})
    with RAG.from_index(xquad_index, cfg, embedder=embedder) as rag:
        yield rag


def test_an_urgent_request_overtakes_30_queued_in_ragserve_and_in_vllm(priority_rag, xquad_corpus):
    rag = priority_rag
    questions = [q["question"] for q in xquad_corpus[1][100:100 + FLOOD + 1]]
    finished: list[str] = []

    async def run() -> None:
        async def one(name: str, question: str, priority: int) -> None:
            result = await rag.aquery(question, priority=priority)
            assert result.answer is not None and result.cache_tier == "miss"
            finished.append(name)

        flood = [asyncio.ensure_future(one(f"batch-{i}", q, 10)) for i, q in enumerate(questions[:FLOOD])]
        # the flood fills ragserve's slots (8, their prompts in vLLM, one generating) and its queue
        await aeventually(lambda: rag.admission.queued == FLOOD - 8, WAIT_S)
        await one("urgent", questions[FLOOD], 0)
        await asyncio.gather(*flood)

    asyncio.run(run())
    place = finished.index("urgent")
    # Ahead of it at most the request vLLM was running and one it had just started: it
    # jumped the 25 in ragserve's queue and the ones waiting in vLLM's (30 of the 33 at least).
    assert place <= 2, finished
