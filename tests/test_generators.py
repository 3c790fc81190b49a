"""The ``openai`` backend's logic against real loopback HTTP servers (uvicorn) that speak
vLLM's OpenAI completions SSE format over a fake word-level model (``fake_openai.py``).
The same backend against a real ``vllm.entrypoints.openai.api_server`` is an engine test."""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack, aclosing

import pytest

from ragserve.cache.redis_server import free_port
from ragserve.config import GenerateConfig, OpenAIConfig
from ragserve.errors import ConfigError, GenerationError, GeneratorUnavailableError
from ragserve.generators import make_generator
from ragserve.generators.openai import OpenAIGenerator
from ragserve.server.httperrors import describe
from ragserve.testing.fake_openai import Behaviour, FakeOpenAI
from ragserve.testing.http import running
from ragserve.testing.waits import aeventually
from ragserve.types import Generation

pytestmark = pytest.mark.http

REPLY = "an answer from the fake server"


@pytest.fixture
def servers():
    """``start(**behaviour) -> (FakeOpenAI, url)``: fake servers, stopped at the end."""
    with ExitStack() as stack:
        def start(**behaviour):
            fake = FakeOpenAI(Behaviour(**behaviour))
            return fake, stack.enter_context(running(fake.app))

        yield start


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: the connection is refused


def make(*urls, max_tokens=16, tokenizer=None, **options) -> OpenAIGenerator:
    opts = {"model": "fake-model", "connect_timeout_s": 1.0, "read_timeout_s": 5.0, "probe_interval_s": 0.1,
            "failures_to_eject": 2, **options}
    return OpenAIGenerator(GenerateConfig(max_tokens=max_tokens), OpenAIConfig(urls=tuple(urls), **opts),
                           tokenizer=tokenizer or object())


async def collect(gen, prompt="a question", request_id="r1", **kw):
    pieces, final = [], None
    async with aclosing(gen.stream(prompt, request_id, **kw)) as stream:
        async for piece in stream:
            if isinstance(piece, Generation):
                final = piece
            else:
                pieces.append(piece)
    return pieces, final


# -- streaming ---------------------------------------------------------------------------


async def test_stream_yields_deltas_then_a_generation_with_the_servers_usage(servers):
    fake, url = servers(token_delay_s=0.02)
    gen = make(url)
    try:
        pieces, final = await collect(gen, "three word prompt", "req-42")
        assert "".join(pieces) == REPLY and pieces[0] == "an" and len(pieces) == 6
        assert final.text == REPLY and final.finish_reason == "stop"
        assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (3, 6)  # the server's count
        assert final.queue_ms == 0 and final.first_token_ms > 10 and final.decode_ms >= 5 * 20 * 0.5
        body = fake.bodies[0]
        assert body["prompt"] == "three word prompt" and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True} and body["model"] == "fake-model"
        assert (body["max_tokens"], body["temperature"], body["top_p"]) == (16, 0.0, 1.0)
        assert "seed" not in body  # greedy: as the vllm backend
        assert fake.headers[0]["x-request-id"] == "req-42"
        assert gen.unfinished() == 0 and gen.stats()["endpoints"][0]["requests"] == 1
    finally:
        await gen.aclose()


async def test_token_ids_go_as_the_prompt_when_they_are_ints_and_max_tokens_caps(servers):
    fake, url = servers()
    gen = make(url, max_tokens=2)
    try:
        _, final = await collect(gen, "the text", token_ids=[5, 6, 7])
        assert fake.bodies[0]["prompt"] == [5, 6, 7]
        assert final.text == "an answer" and final.finish_reason == "length"
        await collect(gen, "the text", token_ids=["the", "text"])  # a test tokenizer's words: send the text
        assert fake.bodies[1]["prompt"] == "the text"
    finally:
        await gen.aclose()


async def test_without_deltas_only_the_generation_and_generate_returns_it(servers):
    _, url = servers()
    gen = make(url)
    try:
        items = [p async for p in gen.stream("q", "r", deltas=False)]
        assert len(items) == 1 and items[0].text == REPLY
        assert (await gen.generate("q", "r2")).text == REPLY
    finally:
        await gen.aclose()


async def test_the_servers_own_timings_give_the_split_when_it_reports_them(servers):
    metrics = {"queue_time_ms": 5.0, "time_to_first_token_ms": 7.0, "generation_time_ms": 11.0}
    _, url = servers(metrics=metrics)
    gen = make(url)
    try:
        _, final = await collect(gen)
        assert (final.queue_ms, final.first_token_ms, final.decode_ms) == (5.0, 7.0, 11.0)
    finally:
        await gen.aclose()


# -- routing, failures, retries ----------------------------------------------------------


async def test_least_outstanding_routing_across_two_endpoints(servers):
    a, url_a = servers()
    b, url_b = servers()
    gen = make(url_a, url_b)
    try:
        with a.held():  # A's request stays in flight until the fast ones are answered, however long
            held = asyncio.create_task(collect(gen, "a slow question"))  # then 6 chunks, 0.3 s apart
            await aeventually(lambda: a.in_flight == 1, what="the slow request to reach A")
            assert [e["outstanding"] for e in gen.stats()["endpoints"]] == [1, 0]
            for i in range(4):  # A holds one request: each of these goes to B
                await collect(gen, f"fast {i}")
            assert (len(a.bodies), len(b.bodies)) == (1, 4)
        await held
        await collect(gen, "after")  # both idle: the one picked longest ago
        assert (len(a.bodies), len(b.bodies)) == (2, 4)
    finally:
        await gen.aclose()


async def test_a_refused_connection_sends_the_request_to_the_other_endpoint(servers):
    live, url = servers()
    dead = dead_url()
    gen = make(dead, url)
    try:
        pieces, final = await collect(gen)
        assert final.text == REPLY and len(live.bodies) == 1
        stats = {e["url"]: e for e in gen.stats()["endpoints"]}
        assert stats[dead]["errors"] == 1 and stats[dead]["failures"] == 1 and not stats[dead]["ejected"]
        assert stats[url]["requests"] == 1 and stats[url]["errors"] == 0
    finally:
        await gen.aclose()


async def test_an_endpoint_is_ejected_after_failures_and_probed_back_in(servers):
    bad, url_bad = servers(status=500, healthy=False)
    good, url_good = servers()
    gen = make(url_bad, url_good, failures_to_eject=2)
    try:
        for _ in range(3):
            assert (await collect(gen))[1].text == REPLY  # every answer comes, retried on the good one
        stats = gen.stats()["endpoints"]
        assert stats[0]["ejected"] and stats[0]["ejections"] == 1 and stats[0]["requests"] == 2
        assert len(good.bodies) == 3 and gen.alive()
        # probes every 0.1 s; the second starts once the first's 503 has been taken in
        await aeventually(lambda: bad.probes >= 2, what="two probes of the ejected endpoint")
        assert gen.stats()["endpoints"][0]["ejected"]  # /health still says 503
        bad.b.status, bad.b.healthy = 200, True
        await aeventually(lambda: not gen.stats()["endpoints"][0]["ejected"], what="a probe to bring it back")
        await collect(gen)
        await collect(gen)
        assert len(bad.bodies) == 3  # back in the rotation: one of the two went to it
    finally:
        await gen.aclose()


async def test_all_endpoints_down_is_a_typed_503(servers):
    urls = (dead_url(), dead_url())
    gen = make(*urls, failures_to_eject=1)
    try:
        with pytest.raises(GeneratorUnavailableError, match="2 tried") as e:
            await collect(gen)
        assert all(u.split("//")[1] in str(e.value) for u in urls)
        assert not gen.alive()  # both ejected at once
        with pytest.raises(GeneratorUnavailableError, match="0 tried, 2 of 2 ejected"):
            await collect(gen)
        assert describe(e.value, "rid").status == 503
    finally:
        await gen.aclose()


async def test_a_stream_cut_after_its_first_token_fails_without_a_retry(servers):
    dying, url_dying = servers(die_after=2)
    other, url_other = servers()
    gen = make(url_dying, url_other)
    pieces = []
    try:
        with pytest.raises(GenerationError, match="broke after 2 pieces") as e:
            async for piece in gen.stream("q", "r"):
                pieces.append(piece)
        assert not isinstance(e.value, GeneratorUnavailableError)
        assert pieces == ["an", " answer"] and other.bodies == []  # no token is ever sent twice
        assert gen.stats()["endpoints"][0]["errors"] == 1 and gen.unfinished() == 0
    finally:
        await gen.aclose()


async def test_a_client_error_is_the_requests_fault_not_the_endpoints(servers):
    refusing, url_a = servers(status=400)
    other, url_b = servers()
    gen = make(url_a, url_b)
    try:
        with pytest.raises(GenerationError, match="HTTP 400"):
            await collect(gen)
        assert other.bodies == [] and gen.stats()["endpoints"][0]["errors"] == 0
    finally:
        await gen.aclose()


async def test_read_timeouts_before_and_after_the_first_token(servers):
    slow, url_slow = servers(header_delay_s=60.0)
    stalling, url_stall = servers(stall_after=1)
    gen = make(url_slow, url_stall, read_timeout_s=0.3)
    try:
        t0 = time.perf_counter()
        # the slow one times out before its first token: retried on the other, which stalls after one
        with pytest.raises(GenerationError, match="ReadTimeout") as e:
            await collect(gen)
        # cut by the 0.3 s read timeouts, not after the slow server's 60 s (30 s: a bound a
        # loaded machine does not reach by accident)
        assert time.perf_counter() - t0 < 30 and not isinstance(e.value, GeneratorUnavailableError)
        assert len(slow.bodies) == 1 and len(stalling.bodies) == 1
        assert [s["errors"] for s in gen.stats()["endpoints"]] == [1, 1]
    finally:
        await gen.aclose()


# -- cancellation ------------------------------------------------------------------------


async def test_closing_the_stream_closes_the_connection_and_the_server_sees_it(servers):
    fake, url = servers(token_delay_s=0.2, reply=" ".join(["word"] * 30))
    gen = make(url, max_tokens=30)
    try:
        stream = gen.stream("q", "r")
        assert await anext(stream) == "word"
        await stream.aclose()
        await aeventually(lambda: fake.disconnects == 1, what="the server to see the disconnect")
        assert gen.unfinished() == 0 and fake.completed == 0
    finally:
        await gen.aclose()


async def test_cancelling_the_task_closes_the_connection(servers):
    fake, url = servers(token_delay_s=0.2, reply=" ".join(["word"] * 30))
    gen = make(url, max_tokens=30)
    try:
        task = asyncio.create_task(gen.generate("q", "r"))
        await aeventually(lambda: fake.in_flight == 1, what="the request to reach the server")
        await asyncio.sleep(0.3)  # a token or so comes (or none: the cancel is what is tested); 30 take 6 s
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await aeventually(lambda: fake.disconnects == 1, what="the server to see the disconnect")
        assert gen.unfinished() == 0 and gen.stats()["endpoints"][0]["errors"] == 0  # not the server's fault
    finally:
        await gen.aclose()


# -- the rest of the protocol ------------------------------------------------------------


async def test_reset_prefix_cache_on_every_endpoint_false_when_refused(servers):
    _, url_a = servers()
    _, url_b = servers()
    _, url_c = servers(dev_mode=False)
    gen = make(url_a, url_b)
    gen_refused = make(url_a, url_c)
    try:
        assert await gen.reset_prefix_cache() is True
        assert await gen_refused.reset_prefix_cache() is False
    finally:
        await gen.aclose()
        await gen_refused.aclose()


async def test_the_model_name_comes_from_v1_models_and_a_wrong_one_is_a_config_error(servers):
    _, url = servers(name="served-name", max_model_len=512)
    gen = make(url, model="")
    try:
        gen.warm_up()
        assert gen.model_name == "served-name"
        assert (await collect(gen))[1].text == REPLY
    finally:
        await gen.aclose()
    with pytest.raises(ConfigError, match="openai.model"):
        make(url, model="other").warm_up()


async def test_make_generator_builds_the_configured_backend(servers):
    from ragserve.config import RAGConfig

    _, url = servers()
    cfg = RAGConfig().replace(generate={"backend": "openai"}, openai={"urls": [url], "model": "fake-model",
                                                                    "tokenizer": "server"})
    gen = make_generator(cfg)
    try:
        assert isinstance(gen, OpenAIGenerator) and gen.alive()
        tok = gen.tokenizer()
        text = tok.apply_chat_template([{"role": "user", "content": "hello there"}], tokenize=False)
        ids = tok.encode(text)
        assert text == "<user> hello there </user> <assistant>" and all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text and tok.encode("hello") == [ids[1]] and tok.remote
    finally:
        await gen.aclose()


def test_make_generator_defaults_to_vllm_without_starting_it(tmp_path):
    from ragserve.config import RAGConfig
    from ragserve.generators.vllm import VllmGenerator

    (tmp_path / "config.json").write_text("{}")
    gen = make_generator(RAGConfig().replace(generate={"model": str(tmp_path)}, vllm={"kv_cache_gib": 1}))
    assert isinstance(gen, VllmGenerator) and gen.vllm.kv_cache_gib == 1 and not gen.alive()


@pytest.mark.integration
async def test_the_local_tokenizer_sends_the_models_own_token_ids(servers):
    from ragserve.errors import ModelError
    from ragserve.generators.prompt import PromptBuilder
    from ragserve.models.resolve import resolve_generation_model

    try:
        resolve_generation_model("default")
    except ModelError as e:
        pytest.skip(str(e))
    fake, url = servers()
    gen = OpenAIGenerator(GenerateConfig(max_tokens=8), OpenAIConfig(urls=(url,), model="fake-model"))
    try:
        gen.warm_up()  # loads the tokenizer files of the local folder (not the weights)
        prompt = PromptBuilder(gen.tokenizer(), 2048, 8).build("What is two and two?", [])
        assert prompt.token_ids and all(isinstance(t, int) for t in prompt.token_ids)
        await collect(gen, prompt.text, token_ids=prompt.token_ids)
        assert fake.bodies[0]["prompt"] == prompt.token_ids
    finally:
        await gen.aclose()
