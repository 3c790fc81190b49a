"""System (c) of the headline benchmark, ``benchmarks/bench_headline_langchain.py``: the LangChain
recipe over the real MiniLM model and FAISS, answering through the fake OpenAI server's
``/v1/chat/completions``, with LangChain's ``RedisCache`` on a real Redis that also holds a
ragserve key. Its packages live outside the lock, in the overlay ``make bench-deps`` fills
(``$BENCH_PEER``, default build/bench-peer), appended to ``sys.path`` as the driver does.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from ragserve.models.resolve import resolve_embedding_model
from ragserve.testing.fake_openai import Behaviour, FakeOpenAI
from ragserve.testing.http import running
from ragserve.testing.redis import redis_server
from ragserve.types import Chunk

from .conftest import load_benchmark

pytestmark = [pytest.mark.integration, pytest.mark.redis]
# NOTE: each test is one event loop: ChatOpenAI's pooled async HTTP connections belong to the
# loop that opened them (asyncio.run per ask fails on the second request with "Event loop is closed").

ROOT = Path(__file__).resolve().parent.parent
OVERLAY = Path(os.environ.get("BENCH_PEER", ROOT / "build" / "bench-peer"))
REPLY = "an answer from the fake server"

CHUNKS = [
    Chunk(0, "paris.txt", "Paris is the capital and most populous city of France."),
    Chunk(1, "rhine.txt", "The Rhine rises in the Swiss Alps and flows into the North Sea."),
    Chunk(2, "piano.txt", "The piano was invented by Bartolomeo Cristofori in Italy around 1700."),
    Chunk(3, "moon.txt", "The Moon is Earth's only natural satellite and orbits it every 27 days."),
    Chunk(4, "python.txt", "Python is a programming language created by Guido van Rossum."),
]


@pytest.fixture(scope="module")
def peer():
    if OVERLAY.is_dir() and str(OVERLAY) not in sys.path:
        sys.path.append(str(OVERLAY))  # appended: the venv's own packages always win
    try:
        import langchain_community  # noqa: F401
        import langchain_huggingface  # noqa: F401
        import langchain_openai  # noqa: F401
    except ImportError as e:
        pytest.skip(f"LangChain peer not installed: make bench-deps ({e})")
    return load_benchmark("bench_headline_langchain")


@pytest.fixture
def setup(peer):
    fake = FakeOpenAI(Behaviour(reply=REPLY))
    with running(fake.app) as url, redis_server(port=None) as redis:  # a unix:// URL, as ragserve's own
        recipe = peer.LangChainRecipe(CHUNKS, resolve_embedding_model("default"), f"{url}/v1", "fake-model",
                                      redis.url, top_k=2, max_tokens=16)
        recipe.build()
        yield recipe, fake


def langchain_keys(recipe) -> list[bytes]:
    return [k for k in recipe.redis.scan_iter() if not k.startswith(b"ragserve:")]


async def test_the_recipe_generates_once_then_answers_from_langchains_redis_cache(setup, peer):
    recipe, fake = setup
    question = "Who invented the piano?"
    assert recipe.retrieve(question)[0] == 2  # the same MiniLM, exact cosine

    assert (await recipe.ask(question)) == (REPLY, False)
    assert (await recipe.ask(question)) == (REPLY, True)
    assert len(fake.chat_bodies) == 1
    body = fake.chat_bodies[0]
    assert body["model"] == "fake-model" and body["temperature"] == 0 and not body.get("stream")
    assert (body.get("max_completion_tokens") or body.get("max_tokens")) == 16
    [message] = body["messages"]
    assert message["role"] == "user"
    context = "\n\n".join(CHUNKS[i].text for i in recipe.retrieve(question))
    assert message["content"] == peer.RAG_PROMPT.format(question=question, context=context)
    assert recipe.cache_stats() == {"lookups": 2, "hits": 1, "writes": 1, "redis_errors": 0}
    assert len(langchain_keys(recipe)) == 1
    assert "langchain-core 1.8.3" in recipe.describe()


async def test_clear_cache_deletes_only_langchains_keys(setup):
    recipe, fake = setup
    ragserve_key = b"ragserve:v1:answer:" + b"0" * 32
    recipe.redis.set(ragserve_key, b"a ragserve answer")
    recipe.redis.set(b"f" * 32, b"a string, not RedisCache's hash")  # a look-alike it must not touch
    await recipe.ask("What is the capital of France?")
    assert recipe.cache_stats()["writes"] == 1

    recipe.clear_cache()
    assert recipe.redis.get(ragserve_key) == b"a ragserve answer"
    assert langchain_keys(recipe) == [b"f" * 32]
    assert recipe.cache_stats() == {"lookups": 0, "hits": 0, "writes": 0, "redis_errors": 0}
    assert (await recipe.ask("What is the capital of France?")) == (REPLY, False)
    assert len(fake.chat_bodies) == 2


async def test_concurrent_asks_each_know_whether_the_cache_answered(setup):
    recipe, fake = setup
    await recipe.ask("Where does the Rhine rise?")
    fake.b.header_delay_s = 0.3

    cached, new, twin = await asyncio.gather(recipe.ask("Where does the Rhine rise?"),
                                             recipe.ask("Who made Python?"), recipe.ask("Who made Python?"))
    assert cached == (REPLY, True)
    # NOTE: LangChain's cache has no single-flight: two concurrent misses on one question both generate.
    assert new == twin == (REPLY, False)
    assert len(fake.chat_bodies) == 3


async def test_a_failing_llm_call_raises_and_is_neither_retried_nor_cached(setup):
    recipe, fake = setup
    fake.b.status = 500
    with pytest.raises(Exception, match="the fake server fails"):
        await recipe.ask("How long is the Moon's orbit?")
    assert len(fake.chat_bodies) == 1  # max_retries=0
    fake.b.status = 200
    assert (await recipe.ask("How long is the Moon's orbit?")) == (REPLY, False)
    assert recipe.cache_stats()["writes"] == 1
