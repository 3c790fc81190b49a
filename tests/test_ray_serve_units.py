"""The logic of ``ragserve.ray_serve`` without a cluster: the ``[ray]`` section, the
deployment options, ``RayGenerator`` over a fake ``DeploymentHandle`` (cancellation, error
mapping, health) and the proxy middleware over a fake proxy app. The same code on a real
local Ray cluster: test_ray_serve.py."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from ragserve.config import RAGConfig
from ragserve.errors import (
    ConfigError,
    DeadlineExceededError,
    EngineDeadError,
    GenerationError,
    GeneratorUnavailableError,
    InvalidParameterError,
    OverloadedError,
    RagserveError,
)
from ragserve.testing.waits import aeventually
from ragserve.types import Generation, TokenUsage

pytest.importorskip("ray", reason="ray[serve] is in the CPU lock; run `make setup`")

GEN = Generation("an answer", TokenUsage(10, 2), "stop", 1.0, 2.0, 3.0)


# -- config -------------------------------------------------------------------------------


def test_the_ray_section_loads_from_env_and_validates_with_field_names():
    cfg = RAGConfig.load(env={"RAGSERVE_RAY_ADDRESS": "auto", "RAGSERVE_RAY_REPLICAS": "3",
                              "RAGSERVE_RAY_GENERATOR_NUM_GPUS": "1"})
    assert (cfg.ray.address, cfg.ray.replicas, cfg.ray.generator_num_gpus) == ("auto", 3, 1.0)
    assert RAGConfig().replace(**cfg.to_dict()) == cfg  # what replicas receive
    assert cfg.fingerprint() == RAGConfig().fingerprint()  # placement never changes an answer
    for bad, field in (({"replicas": 0}, "ray.replicas"),
                       ({"max_queued_requests": 0}, "ray.max_queued_requests"),
                       ({"max_replicas": 2, "min_replicas": 3}, "ray.min_replicas"),
                       ({"max_replicas": 4, "replicas": 5}, "ray.replicas"),
                       ({"follow_index_s": -1}, "ray.follow_index_s")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            RAGConfig().replace(ray=bad)


def test_deployment_options_come_from_the_ray_section():
    from ragserve.ray.serve.app import generator_options, ingress_options

    cfg = RAGConfig().replace(ray={"replicas": 2, "num_cpus": 0.5, "max_queued_requests": 8},
                              server={"retry_after_s": 3})
    opts = ingress_options(cfg)
    assert opts["num_replicas"] == 2 and opts["ray_actor_options"] == {"num_cpus": 0.5}
    assert opts["max_queued_requests"] == 8 and opts["max_ongoing_requests"] == 64
    assert (opts["backpressure_config"].status_code, opts["backpressure_config"].retry_after_s) == (429, 3)
    auto = ingress_options(cfg.replace(ray={"max_replicas": 4, "min_replicas": 1}))
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 4
    gen = generator_options(cfg.replace(ray={"generator_num_gpus": 1}))
    assert gen["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0} and gen["num_replicas"] == 1


def test_generator_deployments_one_per_engine_group_of_models_the_defaults_first():
    from ragserve.ray.serve.app import generator_groups

    assert generator_groups(RAGConfig()) == [("RagserveGenerator", ())]
    cfg = RAGConfig().replace(models={
        "short": {"max_tokens": 8}, "long": {"max_tokens": 128, "temperature": 0.7},
        "wide": {"max_model_len": 4096}, "remote": {"backend": "openai", "openai": {"urls": ["http://h:1"]}},
        "remote2": {"backend": "openai", "openai": {"urls": ["http://h:1"]}}, "default": "wide"})
    assert generator_groups(cfg) == [("RagserveGenerator", ("wide",)),
                                     ("RagserveGenerator-short", ("short", "long")),  # only sampling differs
                                     ("RagserveGenerator-remote", ("remote",)),
                                     ("RagserveGenerator-remote2", ("remote2",))]
    from ragserve.ray.serve.ingress import tokenizer_key

    keys = {n: tokenizer_key(cfg.model_config(n).replace(openai={"tokenizer": "server"})) for n in cfg.models.names}
    assert keys["short"] == keys["long"] == keys["wide"] and keys["remote"] == keys["remote2"] != keys["short"]
    keyed = cfg.model_config("remote").replace(openai={"tokenizer": "server", "api_key": "other"})
    assert tokenizer_key(keyed) != keys["remote"]  # another key: a client of its own

    # one folder named two ways is one engine, as in `ragserve serve`
    from ragserve.models.resolve import resolve_generation_model

    folder = str(resolve_generation_model("default"))
    same = RAGConfig().replace(models={"a": {"max_tokens": 8}, "b": {"model": folder, "max_tokens": 16}})
    assert generator_groups(same) == [("RagserveGenerator", ("a", "b"))]


async def test_a_generator_replica_serves_each_of_its_models_and_refuses_others(monkeypatch):
    from ragserve.errors import UnknownModelError
    from ragserve.ray.serve.client import RayGenerator
    from ragserve.ray.serve.generator import GeneratorServer
    from ragserve.testing.fakes import FakeGenerator

    class Unserved(GeneratorServer):
        def __del__(self) -> None:
            pass

    cfg = RAGConfig().replace(models={"a": {"max_tokens": 8}, "b": {"max_tokens": 16}})
    server = Unserved.__new__(Unserved)
    given, built = FakeGenerator(words=1), FakeGenerator(words=3)
    monkeypatch.setattr("ragserve.generators.make_generator", lambda c: built)  # "b": no vLLM here
    await GeneratorServer.__init__(server, cfg.to_dict(), given, ("a", "b"))

    class Handle:  # calls the replica's methods as Serve would, keyword arguments included
        def options(self, stream=False):
            return self

        def __getattr__(self, name):
            method = getattr(server, name)

            class Method:
                def remote(self, *args, **kwargs):
                    return method(*args, **kwargs)
            return Method()

    b = RayGenerator(Handle(), await server.describe("b"), tokenizer=None, model="b")
    a = RayGenerator(Handle(), await server.describe("a"), tokenizer=None, model="a")
    assert (await b.generate("p", "r1")).text == "an answer more"
    assert (await a.generate("p", "r2")).text == "an"
    assert len(given.prompts) == len(built.prompts) == 1
    with pytest.raises(UnknownModelError):
        await server.generate("p", "r3", model="c")


def test_a_replica_local_l2_is_refused_before_anything_starts():
    from ragserve.ray.serve.app import build_app
    from ragserve.ray.serve.ingress import require_shared_l2

    for url in ("", "embedded"):
        with pytest.raises(ConfigError, match="cache.redis_url.*every replica"):
            require_shared_l2(RAGConfig().replace(cache={"redis_url": url}))
    require_shared_l2(RAGConfig().replace(cache={"enabled": False}))  # no cache at all: nothing to share
    with pytest.raises(ConfigError, match="args.index"):
        build_app({"cache": {"redis_url": "redis://cache:6379/0"}})
    with pytest.raises(ConfigError, match="cache.redis_url"):
        build_app({"index": "/data/indexes/docs"})


# -- RayGenerator over a fake handle ---------------------------------------------------------


class FakeResponse:
    def __init__(self, work):
        self.work = work
        self.cancelled = False

    def __await__(self):
        return self.work.__await__()

    def cancel(self):
        self.cancelled = True


class FakeStream:
    def __init__(self, items, delay=0.0, error=None):
        self.items = list(items)
        self.delay = delay
        self.error = error
        self.cancelled = False

    async def __anext__(self):
        await asyncio.sleep(self.delay)
        if self.error is not None and not self.items:
            raise self.error
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """What RayGenerator uses of a DeploymentHandle: ``.method.remote(...)`` and ``.options``."""

    def __init__(self):
        self.responses, self.streams = [], []
        self.result = GEN
        self.pieces = ["an", " answer", GEN]
        self.error = None
        self.delay = 0.0

    def options(self, stream=False):
        return self

    def __getattr__(self, name):
        handle = self

        class Method:
            def remote(self, *args):
                if name == "stream":
                    s = FakeStream(handle.pieces, handle.delay, handle.error)
                    handle.streams.append(s)
                    return s

                async def work():
                    await asyncio.sleep(handle.delay)
                    if handle.error is not None:
                        raise handle.error
                    return handle.result if name == "generate" else {"alive": True, "unfinished": 0}

                r = FakeResponse(work())
                handle.responses.append(r)
                return r

        return Method()


def make(handle=None):
    from ragserve.ray.serve.client import RayGenerator

    handle = handle or FakeHandle()
    info = {"model_name": "m", "backend": "vllm", "alive": True}
    return RayGenerator(handle, info, tokenizer="tok"), handle


async def test_generate_and_stream_carry_the_backends_result_and_count_calls():
    gen, handle = make()
    assert gen.model_name == "m" and gen.tokenizer() == "tok" and gen.alive()
    assert await gen.generate("p", "r1") == GEN
    assert [p async for p in gen.stream("p", "r2")] == ["an", " answer", GEN]
    assert [p async for p in gen.stream("p", "r3", deltas=False)] == [GEN]  # one unary call
    assert gen.unfinished() == 0 and gen.stats()["calls"]["requests"] == 3
    assert not any(r.cancelled for r in handle.responses) and not handle.streams[0].cancelled


async def test_cancelling_a_call_cancels_it_on_the_generator_replica():
    gen, handle = make()
    handle.delay = 60.0  # only the cancellation ends it within this test
    task = asyncio.ensure_future(gen.generate("p", "r1"))
    await aeventually(lambda: handle.responses, what="the call to reach the handle")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handle.responses[-1].cancelled and gen.unfinished() == 0
    handle.delay = 0.0
    stream = gen.stream("p", "r2")
    assert await anext(stream) == "an"
    await stream.aclose()  # the caller stops reading: a client gone
    assert handle.streams[-1].cancelled and gen.stats()["calls"]["cancelled"] == 2


async def test_errors_on_the_generator_side_map_to_ragserves_tree():
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    gen, handle = make()
    handle.error = RayTaskError("generate", "tb", GenerationError("vLLM refused it"))
    with pytest.raises(GenerationError, match="vLLM refused it"):
        await gen.generate("p", "r1")
    handle.error = BackPressureError(num_queued_requests=4, max_queued_requests=4)
    with pytest.raises(OverloadedError, match="generator deployment's queue is full"):
        await gen.generate("p", "r2")
    assert gen.alive()  # a full queue is not a dead generator
    handle.error = ValueError("a bug over there")
    with pytest.raises(GenerationError, match="ValueError: a bug over there"):
        await gen.generate("p", "r3")
    handle.error = ActorDiedError()
    with pytest.raises(GeneratorUnavailableError, match="Ray replaces a failed replica"):
        async for _ in gen.stream("p", "r4"):
            pass
    assert not gen.alive() and gen.stats()["calls"]["unavailable"] == 1
    handle.error = None
    await gen.probe()  # the next status probe that answers brings it back
    assert gen.alive()



@pytest.mark.parametrize("raised, status", [
    (OverloadedError(8, 16), 429), (DeadlineExceededError(2.5), 504),
    (EngineDeadError("the engine of this replica is dead"), 503),
    (InvalidParameterError("top_k", -1, "an int of at least 1"), 400)],
    ids=["overloaded", "deadline", "engine-dead", "bad-parameter"])
@pytest.mark.parametrize("call", ["generate", "stream"])
async def test_an_error_of_the_generator_replica_crosses_rays_bytes_as_itself(raised, status, call):
    """What the handle raises is Ray's bytes of the replica's RayTaskError, read back and made
    an instance of its cause: the error must unpickle as its own class (RagserveError's
    ``__reduce__``), else Ray gives UnserializableException and the answer is a 502."""
    from ray.exceptions import RayError, RayTaskError

    from ragserve.server.httperrors import describe

    wire = RayError.from_bytes(RayTaskError(call, "tb", raised).to_bytes())
    gen, handle = make()
    handle.error = wire.as_instanceof_cause()
    with pytest.raises(RagserveError) as caught:
        if call == "generate":
            await gen.generate("p", "r1")
        else:
            async for _ in gen.stream("p", "r1"):
                pass
    assert type(caught.value) is type(raised)  # unwrapped: not RayTaskError(OverloadedError)
    assert (str(caught.value), caught.value.__dict__) == (str(raised), raised.__dict__)
    http = describe(caught.value, "r1")
    assert (http.status, http.type, http.message) == (status, type(raised).__name__, str(raised))

# -- the proxy middleware ----------------------------------------------------------------------


def proxy_app(status, body, content_type=b"text/plain; charset=utf-8", start=True):
    async def app(scope, receive, send):
        if not start:
            return  # what the proxy does when the replica died under the request
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"retry-after", b"2"),
                                (b"x-request-id", b"rid")]})
        await send({"type": "http.response.body", "body": body})

    return app


async def call(app):
    from ragserve.ray.serve.proxy import ServeErrorsAsJSON

    sent = []

    async def send(message):
        sent.append(message)

    await ServeErrorsAsJSON(app, retry_after_s=1)({"type": "http"}, None, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body


async def test_serves_own_refusals_get_ragserves_json_shape():
    from ragserve.ray.serve.proxy import middlewares

    assert middlewares()[0].cls.__name__ == "ServeErrorsAsJSON"
    text = b"Request dropped due to backpressure (num_queued_requests=2, max_queued_requests=2)."
    status, headers, body = await call(proxy_app(429, text))
    error = orjson.loads(body)["error"]
    assert status == 429 and headers[b"retry-after"] == b"2" and headers[b"x-request-id"] == b"rid"
    assert error["type"] == "OverloadedError" and error["stage"] == "admission"
    assert "max_queued_requests=2" in error["message"] and headers[b"content-type"] == b"application/json"
    status, headers, body = await call(proxy_app(503, text))  # a Serve left at its default status
    assert status == 429 and orjson.loads(body)["error"]["type"] == "OverloadedError"
    status, _, body = await call(proxy_app(503, b"Deployment is unavailable."))
    assert status == 503 and orjson.loads(body)["error"]["type"] == "Unavailable"
    status, headers, body = await call(proxy_app(0, b"", start=False))
    assert status == 503 and orjson.loads(body)["error"]["type"] == "ReplicaUnavailable"
    assert b"retry-after" in headers


async def test_the_apps_own_json_answers_pass_untouched():
    ours = orjson.dumps({"error": {"type": "OverloadedError", "message": "[admission] overloaded",
                                   "stage": "admission"}})
    status, headers, body = await call(proxy_app(429, ours, b"application/json"))
    assert (status, body, headers[b"retry-after"]) == (429, ours, b"2")
    status, _, body = await call(proxy_app(200, b"plain ok"))
    assert (status, body) == (200, b"plain ok")


# -- the generator deployment's class, without Serve ---------------------------------------


class SlowBackend:
    """A backend whose stream yields a few pieces slowly and records that it was closed."""

    model_name = "m"

    def __init__(self) -> None:
        self.closed = self.started = 0
        self.delay = 0.05

    def warm_up(self) -> None:
        pass

    async def stream(self, prompt, request_id, token_ids=None, deltas=True):
        self.started += 1
        try:
            for piece in ("an", " answer", " slowly"):
                await asyncio.sleep(self.delay)
                yield piece
            yield GEN
        finally:
            self.closed += 1


async def generator_server():
    from ragserve.ray.serve.generator import GeneratorServer

    class Unserved(GeneratorServer):
        def __del__(self) -> None:  # Serve awaits the async one when it stops a replica
            pass

    backend = SlowBackend()
    server = Unserved.__new__(Unserved)
    await GeneratorServer.__init__(server, {}, generator=backend)  # Serve awaits the async __init__
    return server, backend


async def test_the_generator_replica_counts_a_stream_closed_between_pieces_as_aborted():
    server, backend = await generator_server()
    assert [p async for p in server.stream("p", "r1")][-1] == GEN  # read to its end: not aborted
    closed = server.stream("p", "r2")
    assert await anext(closed) == "an"
    await closed.aclose()  # the cancellation landed between two pieces: Serve closes the generator
    backend.delay = 60.0  # its first piece never comes before the cancellation
    cancelled = asyncio.ensure_future(anext(server.stream("p", "r3")))
    await aeventually(lambda: backend.started == 3, what="the third backend stream to start")
    cancelled.cancel()  # the cancellation landed inside the backend's await
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    status = (await server.status())["replica"]
    assert (status["requests"], status["aborted"], status["failed"]) == (3, 2, 0)
    assert backend.closed == 3  # every backend stream was closed, so its request was aborted
