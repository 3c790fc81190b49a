"""MCP (``/mcp`` of ``ragserve serve``, and ``ragserve mcp INDEX`` over stdio), driven by the
official ``mcp`` SDK's own clients against real servers on loopback, with fake models
behind them (the same against the real engine: test_mcp_engine.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time

import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from ragserve.build.builder import build_index
from ragserve.config import RAGConfig
from ragserve.server.app import create_app
from ragserve.server.auth import ApiKeys
from ragserve.server.run import DrainingServer
from ragserve.testing.fake_openai import Behaviour, FakeOpenAI
from ragserve.testing.fakes import FakeEmbedder, FakeGenerator
from ragserve.testing.fakes import fake_rag as make_rag
from ragserve.testing.http import get, post, running
from ragserve.testing.waits import HTTP_TIMEOUT_S, WAIT_S, aeventually

pytestmark = pytest.mark.http

KEY_A, KEY_B = "tenant-a-key-0123456789", "tenant-b-key-0123456789"
MODES = ["auto", "legacy"]
"""auto: the current spec (2026-07-28, one POST per call); legacy: the initialize
handshake and a session (2025-11-25), what most assistants in the field still speak."""
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                         "clientInfo": {"name": "raw", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@contextlib.asynccontextmanager
async def mcp(url, key=None, mode="auto"):
    """The SDK's client over Streamable HTTP, with ``Authorization: Bearer key``."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=HTTP_TIMEOUT_S) as http:
        async with Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode) as client:
            yield client


@pytest.fixture
def served(tmp_path, request):
    """(url, rag) of a server over fakes; ``request.param``: the ``[server]`` settings."""
    rag = make_rag(tmp_path, FakeGenerator(words=4, delay=0.05))
    config = RAGConfig().replace(server=getattr(request, "param", {}))
    with rag, running(create_app(rag, config)) as url:
        yield url, rag


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("served", [{}, {"mcp_stateless": True}], ids=["sessions", "stateless"],
                         indirect=True)
def test_both_tools_are_listed_and_answer_what_v1_answers(served, mode, request):
    url, rag = served
    opened = post(f"{url}/mcp", json=INITIALIZE, headers=MCP_HEADERS)
    stateless = request.node.callspec.params["served"].get("mcp_stateless", False)
    assert opened.status_code == 200 and ("mcp-session-id" in opened.headers) is not stateless

    async def session():
        async with mcp(url, mode=mode) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            retrieved = await c.call_tool("retrieve", {"question": "chunk number 3", "top_k": 2})
            answered = await c.call_tool("answer", {"question": "which chunk?"})
            return c.protocol_version, tools, retrieved, answered

    version, tools, retrieved, answered = asyncio.run(session())
    assert version == ("2026-07-28" if mode == "auto" else "2025-11-25")
    assert set(tools) == {"retrieve", "answer"}
    for tool in tools.values():
        schema = tool.input_schema
        assert schema["required"] == ["question"] and tool.annotations.read_only_hint
        top_k = schema["properties"]["top_k"]
        assert top_k["minimum"] == 1 and top_k["maximum"] == 100
    assert set(tools["retrieve"].output_schema["properties"]) == {"sources", "missing_shards"}
    assert {"answer", "sources", "cache_tier", "model"} <= set(tools["answer"].output_schema["properties"])
    # retrieve: the sources /v1/retrieve gives, with scores and doc ids
    assert not retrieved.is_error
    native = post(f"{url}/v1/retrieve", json={"question": "chunk number 3", "top_k": 2}).json()["sources"]
    assert retrieved.structured_content["sources"] == native and len(native) == 2
    assert retrieved.structured_content["missing_shards"] == []  # whole
    assert json.loads(retrieved.content[0].text) == retrieved.structured_content
    # answer: generated once, through the engine's cache: /v1 then reads the same answer from L1
    a = answered.structured_content
    assert not answered.is_error and a["answer"] == "an answer more more" and a["cache_tier"] == "miss"
    assert a["model"] == "fake-llm" and a["sources"][0]["doc_id"] and a["timings_ms"]["generate"] > 0
    again = post(f"{url}/v1/query", json={"question": "which chunk?"}).json()
    assert again["cache_tier"] == "l1" and again["answer"] == a["answer"]
    assert rag.stats()["queries"] == 2


@pytest.mark.parametrize("mode", MODES)
def test_bad_input_is_a_tool_error_naming_it_and_the_session_goes_on(served, mode):
    url, _ = served
    bad = [("answer", {"question": "   "}, "EmptyQuestionError"),
           ("retrieve", {"question": "q", "top_k": 0}, "top_k must be an int in 1..100, got 0"),
           ("answer", {"question": "q", "top_k": 101}, "top_k must be an int in 1..100, got 101"),
           ("answer", {"question": "x" * 2001}, "QuestionTooLongError"),
           ("retrieve", {"question": "nul \x00 here"}, "InvalidTextError"),
           ("retrieve", {"top_k": 2}, "question"),
           ("answer", {"question": 42}, "question")]

    async def session():
        async with mcp(url, mode=mode) as c:
            # a bad call beside good ones, at the same time: only it fails
            results = await asyncio.gather(*(c.call_tool(name, args) for name, args, _ in bad),
                                           c.call_tool("answer", {"question": "chunk number 2"}),
                                           c.call_tool("retrieve", {"question": "chunk number 2"}))
            after = await c.call_tool("answer", {"question": "chunk number 2"})
            return results, after

    results, after = asyncio.run(session())
    for (name, _, expected), r in zip(bad, results, strict=False):
        assert r.is_error and expected in r.content[0].text, (name, r.content)
        assert "Traceback" not in r.content[0].text
    assert [r.is_error for r in results[len(bad):]] == [False, False]
    assert not after.is_error and after.structured_content["cache_tier"] == "l1"


def test_an_overloaded_engine_is_a_tool_error_and_the_call_in_flight_finishes(tmp_path):
    gen = FakeGenerator(delay=0.05)
    rag = make_rag(tmp_path, gen, query={"max_in_flight": 1, "max_queued": 0})
    with rag, running(create_app(rag, RAGConfig())) as url:
        async def session():
            async with mcp(url) as c:
                gen.hold = True
                first = asyncio.ensure_future(c.call_tool("answer", {"question": "chunk number 1"}))
                await aeventually(lambda: gen.running == 1, what="the first call to reach the generator")
                refused = await c.call_tool("answer", {"question": "chunk number 5"})
                gen.hold = False
                return refused, await first

        refused, first = asyncio.run(session())
    assert refused.is_error
    assert refused.content[0].text.startswith("Error executing tool answer: OverloadedError")
    assert "retry" in refused.content[0].text
    assert not first.is_error and first.structured_content["answer"]


def test_both_tools_name_the_shards_a_partial_result_lacks(served, monkeypatch):
    """A sharded index under ``ray.allow_partial`` (tests/test_partial_shards.py makes the real
    ones): the tools pass the mark on, so an assistant is never handed a partial result as whole."""
    from ragserve.types import Sources

    url, rag = served
    retrieve, query = rag.aretrieve, rag.aquery

    async def partial_retrieve(*args, **kwargs):
        return Sources(await retrieve(*args, **kwargs), ("shard-001",))

    async def partial_query(*args, **kwargs):
        result = await query(*args, **kwargs)
        result.missing_shards = ["shard-001"]
        return result

    monkeypatch.setattr(rag, "aretrieve", partial_retrieve)
    monkeypatch.setattr(rag, "aquery", partial_query)

    async def session():
        async with mcp(url) as c:
            return (await c.call_tool("retrieve", {"question": "chunk number 3"}),
                    await c.call_tool("answer", {"question": "chunk number 3"}))

    retrieved, answered = asyncio.run(session())
    assert not retrieved.is_error and retrieved.structured_content["missing_shards"] == ["shard-001"]
    assert retrieved.structured_content["sources"]
    assert not answered.is_error and answered.structured_content["missing_shards"] == ["shard-001"]


def test_answer_takes_a_model_and_an_unknown_one_is_a_tool_error_naming_it(tmp_path):
    from ragserve.testing.fakes import WordsEmbedder

    gens = {"small": FakeGenerator(words=1), "large": FakeGenerator(words=3)}
    cfg = RAGConfig().replace(models={"small": {"max_tokens": 16}, "large": {"max_tokens": 48}})
    rag = make_rag(tmp_path, config=cfg, generators=gens, embedder=WordsEmbedder())
    with rag, running(create_app(rag, cfg)) as url:
        async def session():
            async with mcp(url) as c:
                tools = {t.name: t for t in (await c.list_tools()).tools}
                calls = [c.call_tool("answer", {"question": "chunk number 3", **m})
                         for m in ({"model": "large"}, {}, {"model": "medium"}, {"model": 7})]
                return tools, [await call for call in calls]

        tools, (large, default, unknown, wrong) = asyncio.run(session())
    assert "model" in tools["answer"].input_schema["properties"] and tools["answer"].input_schema["required"] == [
        "question"]
    assert (large.structured_content["model"], large.structured_content["answer"]) == ("large", "an answer more")
    assert default.structured_content["model"] == "small" and len(gens["small"].prompts) == 1
    assert unknown.is_error and "UnknownModelError [input]: model 'medium' is not served here" in \
        unknown.content[0].text
    assert wrong.is_error and "Traceback" not in wrong.content[0].text
    assert len(gens["large"].prompts) == 1  # neither refusal reached a generator


def test_keys_no_key_wrong_key_and_tenants_that_never_share_an_answer(tmp_path):
    rag = make_rag(tmp_path, FakeGenerator())
    keys = ApiKeys({KEY_A: "tenant-a", KEY_B: "tenant-b"})
    with rag, running(create_app(rag, RAGConfig(), keys=keys)) as url:
        # no key, a wrong key: 401 before the SDK sees the request, so no session is opened
        for headers in ({}, {"Authorization": "Bearer not-a-key-0123456789"}, {"Authorization": KEY_A}):
            r = post(f"{url}/mcp", json=INITIALIZE, headers={**MCP_HEADERS, **headers})
            assert r.status_code == 401 and r.json()["error"]["type"] == "Unauthorized"
            assert r.headers["www-authenticate"] == "Bearer" and "mcp-session-id" not in r.headers
        with pytest.raises(Exception):  # noqa: B017 - whatever the SDK raises, it gets no tools
            asyncio.run(_list_tools(url, None))

        async def tenant(key, question, mode):
            async with mcp(url, key, mode) as c:
                return [(await c.call_tool("answer", {"question": question})).structured_content["cache_tier"]
                        for _ in range(2)]

        for mode, question in zip(MODES, ("chunk number 4", "chunk number 5"), strict=True):
            assert asyncio.run(tenant(KEY_A, question, mode)) == ["miss", "l1"]
            assert asyncio.run(tenant(KEY_B, question, mode)) == ["miss", "l1"]  # A's answer is not B's
        # and through /v1, the same namespaces: B's key reads B's answer, never A's
        assert post(f"{url}/v1/query", json={"question": "chunk number 4", "namespace": "tenant-a"},
                    headers={"Authorization": f"Bearer {KEY_B}"}).json()["cache_tier"] == "l1"
        assert rag.stats()["queries"] == 9 and rag.stats()["cache"]["l1"]["writes"] == 4

        # a session opened with A's key is not B's to use (the SDK answers as if it did not exist)
        a, b = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
        opened = post(f"{url}/mcp", json=INITIALIZE, headers={**MCP_HEADERS, **a})
        sid = opened.headers["mcp-session-id"]
        ask = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        session = {**MCP_HEADERS, "Mcp-Session-Id": sid, "Mcp-Protocol-Version": "2025-11-25"}
        assert post(f"{url}/mcp", json=ask, headers={**session, **b}).status_code == 404
        assert post(f"{url}/mcp", json=ask, headers={**session, **a}).status_code == 200


async def _list_tools(url, key):
    async with mcp(url, key) as c:
        return await c.list_tools()


def test_the_drain_does_not_wait_for_idle_sessions_and_lets_a_call_finish(tmp_path):
    """SIGTERM with an open session (whose client also asked for a GET stream: 405) and
    one call in flight: the call finishes, and the server stops as soon as it has, far
    within the grace period."""
    gen = FakeGenerator(delay=0.05)
    rag = make_rag(tmp_path, gen)
    app = create_app(rag, RAGConfig())
    stopped = threading.Event()
    servers = []

    class Recorded(DrainingServer):
        async def shutdown(self, sockets=None):
            await super().shutdown(sockets)
            stopped.set()

    def make(config):
        servers.append(Recorded(config, app.state.served.state, grace_s=60))
        return servers[0]

    with rag, running(app, server=make) as url:
        assert get(f"{url}/mcp").status_code == 405 and get(f"{url}/mcp").headers["allow"] == "POST, DELETE"

        async def session():
            async with mcp(url, mode="legacy") as idle, mcp(url, mode="legacy") as c:
                await idle.list_tools()
                await c.list_tools()  # the client checks results against the schema: asked now, not later
                gen.hold = True
                call = asyncio.ensure_future(c.call_tool("answer", {"question": "chunk number 6"}))
                await aeventually(lambda: gen.running == 1, what="the call to reach the generator")
                t0 = time.monotonic()
                servers[0].handle_exit(signal.SIGTERM, None)
                refused = await asyncio.to_thread(post, f"{url}/mcp", json=INITIALIZE, headers=MCP_HEADERS)
                gen.hold = False
                result = await call
                await asyncio.to_thread(stopped.wait, WAIT_S)
                return refused, result, time.monotonic() - t0

        refused, result, took = asyncio.run(session())
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "Draining"
    assert not result.is_error and result.structured_content["answer"]
    assert stopped.is_set() and took < 20  # the grace is 60 s: nothing idle held it


def test_mcp_can_be_turned_off(tmp_path):
    rag = make_rag(tmp_path, FakeGenerator())
    with rag, running(create_app(rag, RAGConfig().replace(server={"mcp": False}))) as url:
        assert post(f"{url}/mcp", json=INITIALIZE, headers=MCP_HEADERS).status_code == 404


# -- stdio ----------------------------------------------------------------------------------

LAUNCH = """
import os, runpy, subprocess, sys
from ragserve.rag import RAG
from ragserve.testing.fakes import FakeEmbedder

opened = RAG.from_index.__func__

def noisy_open(cls, path, config=None, **kw):
    # what a real engine does while it starts: print, write to fd 1 from C, start children
    print("noise from print()")
    os.write(1, b"noise from fd 1\\n")
    subprocess.run(["sh", "-c", "echo noise from a child process"], check=True)
    return opened(cls, path, config, embedder=FakeEmbedder(), **kw)

RAG.from_index = classmethod(noisy_open)
sys.argv = ["ragserve", *sys.argv[1:]]
runpy.run_module("ragserve.cli", run_name="__main__", alter_sys=True)
"""
"""``python -m ragserve.cli`` with the index's (fake) embedder, and an engine start that
prints to stdout every way an engine does."""


def test_stdio_carries_only_json_rpc_and_answers_through_an_openai_server(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    for i in range(8):
        text = f"Paragraph {i} says that the number of the day is {i * 7}."
        (src / f"doc{i}.txt").write_text(text, "utf-8")
    build_index(src, tmp_path / "index", RAGConfig(), embedder=FakeEmbedder())
    fake = FakeOpenAI(Behaviour(token_delay_s=0.001))
    stray, errlog = [], tmp_path / "stderr.log"

    async def stray_lines(message):
        if isinstance(message, Exception):
            stray.append(message)

    async def session(url):
        env = {**os.environ, "RAGSERVE_GENERATE_BACKEND": "openai", "RAGSERVE_OPENAI_URLS": url,
               "RAGSERVE_OPENAI_TOKENIZER": "server", "RAGSERVE_GENERATE_MAX_TOKENS": "16",
               "RAGSERVE_HOME": str(tmp_path / "home")}
        args = ["-c", LAUNCH, "mcp", str(tmp_path / "index")]
        params = StdioServerParameters(command=sys.executable, args=args, env=env)
        with open(errlog, "w") as err:
            async with Client(stdio_client(params, errlog=err), message_handler=stray_lines) as c:
                tools = [t.name for t in (await c.list_tools()).tools]
                answered = await c.call_tool("answer", {"question": "What is the number of the day?"})
                bad = await c.call_tool("retrieve", {"question": "", "top_k": 2})
                retrieved = await c.call_tool("retrieve", {"question": "Which one says 21?", "top_k": 3})
                return tools, answered, bad, retrieved

    with running(fake.app) as url:
        tools, answered, bad, retrieved = asyncio.run(asyncio.wait_for(session(url), 120))
    assert sorted(tools) == ["answer", "retrieve"]
    a = answered.structured_content
    assert not answered.is_error and a["answer"] == "an answer from the fake server"
    assert a["model"] == "fake-model"
    assert fake.bodies and a["cache_tier"] == "miss"
    assert bad.is_error and "EmptyQuestionError" in bad.content[0].text
    assert not retrieved.is_error and len(retrieved.structured_content["sources"]) == 3
    assert stray == []  # nothing but JSON-RPC reached stdout ...
    log = errlog.read_text()
    for noise in ("noise from print()", "noise from fd 1", "noise from a child process"):
        assert noise in log  # ... what the engine printed went to stderr
    assert "stdin closed, stopped" in log


def test_stdio_refuses_a_missing_index_with_one_line_and_status_1(tmp_path):
    from typer.testing import CliRunner

    from ragserve.cli import app

    r = CliRunner().invoke(app, ["mcp", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "no index folder" in r.output


@pytest.mark.integration
def test_the_real_command_over_stdio_retrieves_with_the_default_embedder(xquad_index, xquad_corpus, embedder, tmp_path):
    """Literally ``python -m ragserve.cli mcp INDEX --lazy``: the default configuration and
    embedding model, the SDK's stdio client. ``retrieve`` needs no generation engine, and
    ``--lazy`` starts none until ``answer``. A ``RAGSERVE_HOME`` without the prepared
    language model makes any start fail before vLLM runs (so this never starts one): a start
    at launch would fail the launch, and the ``answer`` call shows the start happening there."""
    from ragserve import RAG

    _, qs = xquad_corpus
    q = next(q for q in qs if "Super Bowl 50" in q["question"])
    with RAG.from_index(xquad_index, RAGConfig(), start_engine=False, embedder=embedder) as rag:
        expected = [(s.doc_id, s.chunk_id, s.score) for s in rag.retrieve(q["question"], top_k=3)]
    stray, errlog = [], tmp_path / "stderr.log"

    async def stray_lines(message):
        if isinstance(message, Exception):
            stray.append(message)

    env = {**os.environ, "RAGSERVE_HOME": str(tmp_path / "home")}
    params = StdioServerParameters(command=sys.executable, args=["-m", "ragserve.cli", "mcp", str(xquad_index),
                                                                 "--lazy"], env=env)

    async def session():
        with open(errlog, "w") as err:
            async with Client(stdio_client(params, errlog=err), message_handler=stray_lines) as c:
                marks.append(time.perf_counter())
                tools = sorted(t.name for t in (await c.list_tools()).tools)
                retrieved = await c.call_tool("retrieve", {"question": q["question"], "top_k": 3})
                marks.append(time.perf_counter())
                answered = await c.call_tool("answer", {"question": q["question"]})
                marks.append(time.perf_counter())
                return tools, retrieved, answered

    marks = [time.perf_counter()]
    tools, retrieved, answered = asyncio.run(asyncio.wait_for(session(), 120))
    marks.append(time.perf_counter())
    log = errlog.read_text()
    assert tools == ["answer", "retrieve"], log
    assert not retrieved.is_error, retrieved.content
    sources = retrieved.structured_content["sources"]
    assert sources[0]["doc_id"] == q["doc_id"]  # the question's own paragraph, first
    assert [(s["doc_id"], s["chunk_id"]) for s in sources] == [e[:2] for e in expected]
    assert [s["score"] for s in sources] == pytest.approx([e[2] for e in expected], abs=1e-4)
    text = answered.content[0].text
    assert answered.is_error and "ModelError" in text and "not prepared" in text, text  # started here
    assert stray == []  # nothing but JSON-RPC reached stdout
    assert "stdin closed, stopped" in log
    print("stdio: launch to connected {:.1f} s, tools and retrieve {:.2f} s, answer {:.2f} s, "
          "stop {:.1f} s".format(*(b - a for a, b in zip(marks, marks[1:]))))
