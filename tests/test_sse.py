"""Streaming over HTTP writes what has arrived, never waits for more: token pieces that
reach the server's loop together go out as one event and one write; the first piece goes
out at once. Below it, the relay from the engine loop (one wake-up per turn of the engine
loop, however many streams it fed) and the per-token encodings."""

import asyncio
import gc
import json
import threading

import httpx
import orjson
import pytest

from ragserve.config import RAGConfig
from ragserve.engine.runtime import LoopThread
from ragserve.server import sse
from ragserve.server.app import create_app
from ragserve.server.openai_api import content_framer
from ragserve.testing.fakes import FakeGenerator
from ragserve.testing.fakes import fake_rag as make_rag
from ragserve.testing.http import running
from ragserve.testing.waits import HTTP_TIMEOUT_S, WAIT_S, aeventually, eventually
from ragserve.types import DoneEvent, Generation, SourcesEvent, TokenEvent, TokenUsage

from .test_http import sse_events

PIECES = [f" w{i}" for i in range(50)]


class Burst(FakeGenerator):
    """The first piece; then, once ``go`` is set (the client has that piece), the other 49
    with no await between them. A first piece held back to be batched never reaches the
    client alone: the wait for ``go`` fails the stream."""

    def __init__(self):
        super().__init__()
        self.go = threading.Event()

    async def stream(self, prompt, request_id, token_ids=None, deltas=True):
        self.prompts.append(prompt)
        yield PIECES[0]
        await aeventually(self.go.is_set, WAIT_S, 0.005, "the client to have the first piece")
        for piece in PIECES[1:]:
            yield piece
        yield Generation("".join(PIECES), TokenUsage(3, len(PIECES)), "stop", 1.0, 2.0, 3.0)


# -- the relay from the engine loop ------------------------------------------------------------


async def test_batches_hold_what_arrived_together_and_the_first_item_comes_alone():
    rt = LoopThread(name="test-relay")
    taken = threading.Event()  # set by the reader once item 0 has reached it

    async def produce():
        yield 0
        # not held back to be batched: the reader has it before the others exist
        await aeventually(taken.is_set, WAIT_S, 0.005, "the reader to have item 0")
        for i in range(1, 50):
            yield i  # no await between them: they cross in one turn of the engine loop

    try:
        got = []
        async for batch in rt.aiterate(produce()).batches():
            got.append(batch)
            taken.set()
        assert got[0] == [0]
        assert [x for b in got for x in b] == list(range(50)) and len(got) < 10
    finally:
        rt.stop()


async def test_one_wake_up_of_the_readers_loop_for_many_streams_fed_in_one_turn():
    rt = LoopThread(name="test-relay")
    loop = asyncio.get_running_loop()
    engine_go = asyncio.Event()  # waited on (so bound to) the engine loop

    started = []

    async def produce(i):
        started.append(i)
        await engine_go.wait()
        yield i

    wakes = 0
    real = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        nonlocal wakes
        wakes += 1
        return real(*args, **kwargs)

    loop.call_soon_threadsafe = counting
    try:
        relays = [rt.aiterate(produce(i)) for i in range(32)]
        readers = [asyncio.ensure_future(anext(r)) for r in relays]
        # every reader has started its producer, which waits on the engine loop
        await aeventually(lambda: len(started) == 32, what="the 32 producers to start")
        wakes = 0
        rt.loop.call_soon_threadsafe(engine_go.set)  # all 32 items in one turn of the engine loop
        # Hold this loop (a blocking wait, not an await) until all 32 are posted, so the count
        # does not depend on when the machine lets this loop run in between.
        pending = rt.mailbox(loop)._pending
        eventually(lambda: len(pending) >= 32, WAIT_S, 0.001, "the 32 items to be posted")  # blocks this loop
        assert sorted(await asyncio.gather(*readers)) == list(range(32))
        assert wakes == 1, wakes  # one wake-up for the turn, not 32
        for r in relays:
            await r.aclose()
    finally:
        del loop.call_soon_threadsafe
        rt.stop()


async def test_closing_or_dropping_a_relay_cancels_its_producer():
    rt = LoopThread(name="test-relay")
    ended = []

    async def produce(name):
        try:
            while True:
                yield name
                await asyncio.sleep(0.01)
        finally:
            ended.append(name)

    try:
        closed = rt.aiterate(produce("closed"))
        assert await anext(closed) == "closed"
        await closed.aclose()
        dropped = rt.aiterate(produce("dropped"))
        assert await anext(dropped) == "dropped"
        del dropped
        gc.collect()
        await aeventually(lambda: len(ended) == 2, what="both producers to be cancelled")
        assert sorted(ended) == ["closed", "dropped"]
    finally:
        rt.stop()


async def test_a_producers_error_comes_after_the_items_before_it():
    rt = LoopThread(name="test-relay")

    async def produce():
        yield 1
        yield 2
        raise KeyError("boom")

    try:
        got = []
        with pytest.raises(KeyError, match="boom"):
            async for batch in rt.aiterate(produce()).batches():
                got += batch
        assert got == [1, 2]
    finally:
        rt.stop()


# -- coalescing and encoding -----------------------------------------------------------------------


def test_coalesce_joins_runs_of_tokens_and_keeps_everything_else_in_place():
    done = DoneEvent(None)
    batch = [TokenEvent("a"), TokenEvent("b"), done, TokenEvent("c")]
    assert sse.coalesce(batch) == [TokenEvent("ab"), done, TokenEvent("c")]
    one = [TokenEvent("x")]
    assert sse.coalesce(one) is one
    src = SourcesEvent([], "miss")
    assert sse.coalesce([src, TokenEvent("p")]) == [src, TokenEvent("p")]


@pytest.mark.parametrize("text", ["plain", ' "quoted" ', "new\nline", "naïve ☃ 😀", "\\back\\", "", "\t\u2028"])
def test_per_token_frames_are_the_generic_frames_byte_for_byte(text):
    assert sse.token_frame(text) == sse.frame({"text": text}, "token")
    cid, created, model = "chatcmpl-r1", 1700000000, 'a "model" with content'
    full = sse.frame({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                      "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
    assert content_framer(cid, created, model)(text) == full
    assert orjson.loads(full[6:])["choices"][0]["delta"]["content"] == text


# -- over HTTP ---------------------------------------------------------------------------------------


@pytest.fixture
def burst_server(tmp_path):
    """(url, the ``Burst`` generator behind it)."""
    burst = Burst()
    rag = make_rag(tmp_path, burst, cache={"enabled": False})
    with rag, running(create_app(rag, RAGConfig())) as url:
        yield url, burst


def streamed_lines(url, path, body, go, first):
    """The lines of a streamed response; ``go`` is set once the ``first(line)`` one came."""
    lines = []
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
        with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                if first(line):
                    go.set()
    return lines


@pytest.mark.http
def test_native_stream_coalesces_pieces_that_arrive_together_and_sends_the_first_at_once(burst_server):
    url, burst = burst_server
    # The others are made only once the client has the first token: it was sent at once.
    lines = streamed_lines(url, "/v1/query", {"question": "burst?", "stream": True}, burst.go,
                           lambda line: line.startswith("event: token"))
    events = sse_events("\n".join(lines) + "\n")
    names = [e for e, _ in events]
    assert names[0] == "sources" and names[-1] == "done" and set(names[1:-1]) == {"token"}
    tokens = [d["text"] for e, d in events if e == "token"]
    assert "".join(tokens) == events[-1][1]["answer"] == "".join(PIECES)
    assert tokens[0] == PIECES[0] and len(tokens) < len(PIECES) // 2


@pytest.mark.http
def test_openai_stream_coalesces_into_valid_chunks_ending_with_done(burst_server):
    body = {"model": "ragserve", "stream": True, "messages": [{"role": "user", "content": "burst?"}],
            "stream_options": {"include_usage": True}}
    url, burst = burst_server
    def has_content(line):
        choices = json.loads(line[6:])["choices"] if line.startswith("data: {") else []
        return any(c["delta"].get("content") for c in choices)

    lines = streamed_lines(url, "/v1/chat/completions", body, burst.go, has_content)
    events = sse_events("\n".join(lines) + "\n")
    assert events[-1] == (None, "[DONE]") and events[0][1]["sources"]
    chunks = [d for _, d in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    content = [c["choices"][0]["delta"]["content"] for c in chunks
               if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert "".join(content) == "".join(PIECES) and content[0] == PIECES[0] and len(content) < len(PIECES) // 2
    assert chunks[-1]["usage"]["completion_tokens"] == len(PIECES)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert json.loads(json.dumps(chunks))  # every frame was one valid JSON document


async def test_read_events_is_the_inverse_of_frame():
    from ragserve.server.sse import frame, read_events

    text = (frame({"a": 1}, "sources") + frame({"text": "x\ny"}, "token") + frame({"b": 2})).decode()

    async def lines():
        for line in text.split("\n"):
            yield line

    got = [(e, orjson.loads(d)) async for e, d in read_events(lines())]
    assert got == [("sources", {"a": 1}), ("token", {"text": "x\ny"}), (None, {"b": 2})]
