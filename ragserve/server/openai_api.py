"""OpenAI-compatible endpoints, so standard clients work unchanged: the ``openai`` SDK,
LangChain's ``ChatOpenAI``, Open WebUI.

- ``POST /v1/chat/completions``: the last user message is the question (earlier turns
  are not used for retrieval or generation: ragserve answers one grounded question).
  ``model`` must be a served model's id (``[models]``' names, "auto" with a route; without
  ``[models]`` the one model's id) or ``ragserve`` (the default, or the router's pick); any
  other is 404 with OpenAI's error body (``code: "model_not_found"``). Sampling options are
  the model's (they are part of every answer's cache key): ``temperature`` and ``top_p`` are
  accepted when absent or equal to the model's values and refused with 400 otherwise;
  ``max_tokens`` / ``max_completion_tokens`` when absent or at least the model's
  ``max_tokens`` (a larger cap cannot change the answer), else 400; ``n`` must be 1. The
  response's ``model`` is the model that answered (a routed stream's last chunk says it).
- Sources are never lost: a top-level ``sources`` field on the response; when streaming,
  the first frame is a ``chat.completion.chunk`` with empty ``choices`` and the
  ``sources`` (SDKs parse it like a usage chunk), then the token chunks, then
  ``data: [DONE]``. ``ragserve`` carries the cache tier and the stage timings.
- ``GET /v1/models``: the served models (``[models]``), or the one model.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from typing import Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from ragserve.config import GenerateConfig
from ragserve.errors import InputError, UnknownModelError
from ragserve.server import sse
from ragserve.server.common import (
    Served,
    answer_headers,
    charge_done,
    first_event,
    request_id,
    source_json,
    until_disconnected,
)
from ragserve.server.httperrors import HTTPError, body, describe, json_response
from ragserve.server.schemas import ChatCompletionRequest
from ragserve.server.tenants import Tenant
from ragserve.types import DoneEvent, QueryResult, SourcesEvent, StreamEvent, TokenEvent

ALIAS = "ragserve"


def add_openai_routes(app: FastAPI, served: Served) -> None:
    @app.get("/v1/models", summary="OpenAI-compatible: the served models")
    async def models(request: Request) -> Response:
        served.check_key(request)
        if not served.rag.models.names:
            return json_response({"object": "list", "data": [
                {"id": model_id(served), "object": "model", "created": 0, "owned_by": "ragserve"}]})
        return json_response({"object": "list", "data": [
            {"object": "model", "created": 0, "owned_by": "ragserve", **m} for m in served.rag.models.describe()]})

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat completion, grounded, with sources")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        rid = request_id(request)
        namespace = served.tenant(request, None)
        tenant = served.tenant_of(request)
        asked, model = check_options(req, served)
        question = last_user_message(req)
        priority = served.priority(request, tenant, req_priority(req))
        opts = dict(namespace=namespace, request_id=rid, priority=priority, model=asked)
        await served.admit(tenant)
        served.check_engine()
        cid, created = f"chatcmpl-{rid}", int(time.time())
        if req.stream:
            events = served.rag.astream(question, **opts)
            first = await until_disconnected(request, first_event(events))
            usage = bool(req.stream_options and req.stream_options.include_usage)
            frames = _chunks(first, events, cid, created, model, usage, served, rid, tenant)
            return StreamingResponse(frames, media_type="text/event-stream",
                                     headers={**sse.HEADERS,
                                              **answer_headers(first.cache_tier, first.missing_shards)})
        r = await until_disconnected(request, served.rag.aquery(question, **opts))
        await served.charge(tenant, r)
        return json_response({
            "id": cid, "object": "chat.completion", "created": created,
            "model": r.model if asked_named(served) else model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r.answer},
                         "finish_reason": _finish_reason(r), "logprobs": None}],
            "usage": _usage(r), "sources": [source_json(s) for s in r.sources], "ragserve": _extra(r),
        }, headers=answer_headers(r.cache_tier, r.missing_shards))


def model_id(served: Served) -> str:
    from ragserve.models.resolve import resolve_generation_model

    name = getattr(served.rag.generator, "model_name", None)
    return name or resolve_generation_model(served.config.generate.model).name


def asked_named(served: Served) -> bool:
    """``[models]`` names the models: a response says which one answered."""
    return bool(served.rag.models.names)


def check_options(req: ChatCompletionRequest, served: Served) -> tuple[str | None, str]:
    """The ``model`` to ask the engine for (None: the default or the router's pick) and the
    id the response names until the answer says which model it was; 404 for a model not
    served, 400 for sampling options the model does not use."""
    asked, models = None, served.rag.models
    if not models.names:
        shown, configs = model_id(served), [served.config.generate]
        if req.model not in (shown, ALIAS):
            raise model_not_found(UnknownModelError(req.model, (shown, ALIAS)))
    else:
        chosen = models.choose(None)
        if req.model != ALIAS:
            try:
                chosen = models.choose(req.model)
            except UnknownModelError as e:
                raise model_not_found(UnknownModelError(req.model, (*e.known, ALIAS))) from None
            asked = req.model
        shown = chosen.name
        configs = [m.config.generate for m in (getattr(chosen, "small", None), getattr(chosen, "large", None))
                   if m is not None] or [chosen.config.generate]
    refused = [r for g in configs for r in _refused_sampling(req, g)]
    if req.n not in (None, 1):
        refused.append(f"n={req.n} (one answer per request)")
    if refused:
        raise InputError("sampling options are the server's (they are part of every cached answer's key); "
                         "omit them or send the server's values: " + "; ".join(dict.fromkeys(refused)))
    return asked, shown


def _refused_sampling(req: ChatCompletionRequest, g: GenerateConfig) -> list[str]:
    refused = []
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens < g.max_tokens:  # a larger cap cannot change the answer
        refused.append(f"max_tokens={max_tokens} (this model generates up to {g.max_tokens}: max_tokens; "
                       "send that or more)")
    if req.temperature is not None and req.temperature != g.temperature:
        refused.append(f"temperature={req.temperature:g} (this model uses {g.temperature:g}: temperature)")
    if req.top_p is not None and req.top_p != g.top_p:
        refused.append(f"top_p={req.top_p:g} (this model uses {g.top_p:g}: top_p)")
    return refused


def model_not_found(e: UnknownModelError) -> HTTPError:
    """OpenAI's 404 for a model it does not serve: its error body's ``param`` and ``code``
    (SDKs raise ``NotFoundError``), with ragserve's ``type`` (``ModelNotFound``, as this
    route has always named it) and ``stage``."""
    return HTTPError(404, "ModelNotFound", str(e).removeprefix(f"[{e.stage}] "), e.stage,
                     fields={"param": "model", "code": "model_not_found"})


def req_priority(req: ChatCompletionRequest) -> Any:
    """vLLM's server takes ``priority`` as an extra body field of the OpenAI request; so
    does this one (``X-Priority`` otherwise)."""
    return (req.model_extra or {}).get("priority")


def last_user_message(req: ChatCompletionRequest) -> str:
    for message in reversed(req.messages):
        if message.role == "user":
            content = message.content
            if isinstance(content, list):  # content parts: the text ones, joined
                content = " ".join(p.text for p in content if p.type == "text" and p.text)
            if isinstance(content, str):
                return content
    raise InputError("no user message with text content: the last user message is the question")


async def _chunks(first: SourcesEvent, events: AsyncIterator[StreamEvent], cid: str, created: int, model: str,
                  usage: bool, served: Served, rid: str,
                  tenant: Tenant | None = None) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse.frame({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": choices, **extra})

    content = content_framer(cid, created, model)

    def frames(batch: list[StreamEvent]) -> Iterator[bytes]:
        for event in batch:
            if isinstance(event, TokenEvent) and event.text:
                yield content(event.text)
            elif isinstance(event, DoneEvent):
                r = event.result
                last = {"model": r.model} if asked_named(served) else {}  # a routed stream: who answered
                yield chunk([{"index": 0, "delta": {}, "finish_reason": _finish_reason(r)}], ragserve=_extra(r), **last)
                if usage:
                    yield chunk([], usage=_usage(r))

    try:
        head: dict[str, Any] = {"cache_tier": first.cache_tier}
        if first.missing_shards:
            head["missing_shards"] = list(first.missing_shards)
        yield chunk([], sources=[source_json(s) for s in first.sources], ragserve=head)
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async with aclosing(sse.batches(events)) as batches:  # pieces that arrived together: one chunk
            async for batch in batches:
                await charge_done(served, tenant, batch)
                out = b"".join(frames(sse.coalesce(batch)))
                if out:
                    yield out
        yield sse.DONE
    except Exception as e:  # noqa: BLE001 - the SDKs raise APIError on an error frame
        yield sse.frame(body(describe(e, rid, served.config.server.retry_after_s)))
    finally:
        await events.aclose()  # type: ignore[attr-defined]


def content_framer(cid: str, created: int, model: str) -> Callable[[str], bytes]:
    """The frame of a content chunk, as ``sse.frame`` writes it, with the parts that are
    the same for every token of a stream encoded once: per token, only its text is."""
    head = sse.frame({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                      "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]})
    before, after = head.split(b'"content":""', 1)
    before += b'"content":'

    def content(text: str) -> bytes:
        return before + orjson.dumps(text) + after

    return content


def _finish_reason(r: QueryResult) -> str:
    return "length" if r.finish_reason == "length" else "stop"


def _usage(r: QueryResult) -> dict[str, int]:
    return {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
            "total_tokens": r.usage.total_tokens}


def _extra(r: QueryResult) -> dict[str, Any]:
    extra = {"cache_tier": r.cache_tier, "timings": r.timings.as_dict(),
             "index_fingerprint": r.index_fingerprint, "request_id": r.request_id}
    if r.missing_shards:  # grounded without these shards (ray.allow_partial)
        extra["missing_shards"] = list(r.missing_shards)
    return extra
