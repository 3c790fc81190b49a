"""The ``openai`` backend: generation on remote OpenAI-compatible servers.

Built for vLLM's own server (``python -m vllm.entrypoints.openai.api_server``, one per GPU
node) and usable with any server that speaks ``POST /v1/completions`` with SSE streaming.
Each request is one streamed completion of the rendered prompt; every endpoint has its
own pooled ``httpx.AsyncClient`` (keep-alive connections); ``endpoints.py`` picks the
endpoint (least outstanding requests) and ejects and probes failing ones, and
``completions.py`` writes the request and reads the stream.

- **Prompt.** The chat template is applied here (the prompt builder's token budget needs
  it), so the completions endpoint gets the rendered prompt: as token ids when the
  tokenizer gave integer ids (vLLM accepts a list of ints as ``prompt`` and tokenizes
  nothing again), else as text.
- **Retries** go to another endpoint only while nothing was generated: a failure before
  the first streamed chunk (connection refused, connect or read timeout, a 5xx, a 429, a
  stream cut before its first token) moves the request on, at most ``openai.retries``
  times; a failure after it is the request's ``GenerationError``. When no endpoint can take
  the request: ``GeneratorUnavailableError`` (HTTP 503).
- **Cancellation.** Cancelling the awaiting task, or closing the stream, closes the HTTP
  response and so its connection: vLLM's server then aborts the request.
- **Stage split.** Measured client-side: ``first_token_ms`` is the time from sending the
  request to its first streamed chunk, queue and prefill together (``queue_ms`` stays 0:
  a client cannot tell them apart), and ``decode_ms`` runs from the first chunk to the last.
  A server that reports its own per-request times on the final usage chunk (vLLM with
  ``--enable-per-request-metrics``) gives the same split as the vllm backend instead:
  queue, scheduled → first token, first → last token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, NoReturn

import httpx

from ragserve.config import GenerateConfig, OpenAIConfig
from ragserve.config.generators import normalise_url
from ragserve.errors import ConfigError, GenerationError, GeneratorUnavailableError
from ragserve.generators.completions import Attempt, parse_chunk, request_body
from ragserve.generators.endpoints import Endpoint, Endpoints, shown_url
from ragserve.observe.propagation import traceparent_for
from ragserve.types import Generation

log = logging.getLogger("ragserve.generate")


class _Retry(Exception):
    """An attempt failed before its first chunk: another endpoint may take the request."""


class OpenAIGenerator:
    """**Usage:**

        gen = OpenAIGenerator(GenerateConfig(), OpenAIConfig(urls=("http://gpu-1:8000",)))
        gen.warm_up()                       # HTTP clients, tokenizer, the served model's name
        async for piece in gen.stream(prompt, "req-1"): ...

    ``tokenizer``: an object to use instead of the one ``openai.tokenizer`` names.
    """

    def __init__(self, config: GenerateConfig | None = None, options: OpenAIConfig | None = None, *,
                 tokenizer: Any = None) -> None:
        self.config = config or GenerateConfig()
        self.options = options or OpenAIConfig()
        if not self.options.urls:
            raise ConfigError("openai.urls", "the openai backend needs at least one server URL")
        self.model_name = self.options.model
        """The served model name (resolved from ``GET /v1/models`` when not configured)."""
        o = self.options
        urls = [normalise_url(u) for u in o.urls]
        self.endpoints = Endpoints(urls, o.failures_to_eject, o.probe_interval_s, self._probe)
        self._headers = {"Authorization": f"Bearer {o.api_key}"} if o.api_key else {}
        self._timeout = httpx.Timeout(o.read_timeout_s, connect=o.connect_timeout_s, pool=None)
        # Probes and admin calls answer at once on a live server: they must not wait a read timeout.
        self._short = httpx.Timeout(max(o.connect_timeout_s, 5.0), connect=o.connect_timeout_s)
        self._tokenizer = tokenizer
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._lock = threading.Lock()

    # -- life cycle --------------------------------------------------------------------

    def warm_up(self) -> None:
        """Create the HTTP clients, load the tokenizer, ask the servers for the model
        (idempotent; cheap once done). Servers that do not answer yet are not an error:
        requests find out, and the model name is then asked for on the first one."""
        if self._clients:
            return
        with self._lock:
            if self._clients:
                return
            if self._tokenizer is None and self.options.tokenizer == "":
                from ragserve.generators.tokenizers import local_tokenizer

                self._tokenizer = local_tokenizer(self.config.model)
            self._check_models()
            o = self.options
            limits = httpx.Limits(max_connections=o.max_connections,
                                  max_keepalive_connections=o.max_connections)
            self._clients = {
                ep.url: httpx.AsyncClient(base_url=ep.url, headers=self._headers, timeout=self._timeout,
                                          limits=limits)
                for ep in self.endpoints.all
            }

    def _check_models(self) -> None:
        """The served models, asked once at start (blocking, short timeouts): fills in
        ``model_name``; a configured model a server does not serve is a ConfigError."""
        for ep in self.endpoints.all:
            try:
                r = httpx.get(ep.url + "/v1/models", headers=self._headers, timeout=self._short)
                listed = {m["id"]: m for m in r.json()["data"]} if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                log.warning("generator endpoint %s did not list its models at start: %s",
                            shown_url(ep.url), e)
                continue
            if not listed:
                continue
            if not self.model_name:
                self.model_name = next(iter(listed))
            if self.model_name not in listed:
                served = ", ".join(map(repr, listed))
                raise ConfigError("openai.model",
                                  f"{shown_url(ep.url)} serves {served}, not {self.model_name!r}")
            served_len = listed[self.model_name].get("max_model_len")
            if isinstance(served_len, int) and served_len < self.config.max_model_len:
                log.warning("%s serves %s with max_model_len %d < generate.max_model_len %d: long prompts "
                            "will be refused", shown_url(ep.url), self.model_name, served_len,
                            self.config.max_model_len)

    def tokenizer(self) -> Any:
        """The tokenizer of the prompt budget (``openai.tokenizer``; see ``tokenizers.py``)."""
        if self._tokenizer is None:
            from ragserve.generators import tokenizers

            if self.options.tokenizer == "server":
                self._tokenizer = tokenizers.ServerTokenizer(
                    lambda: self.endpoints.all, lambda: self.model_name, self._headers, self._timeout)
            else:
                self._tokenizer = tokenizers.local_tokenizer(self.config.model)
        return self._tokenizer

    def alive(self) -> bool:
        """At least one endpoint is not ejected."""
        return any(not ep.ejected for ep in self.endpoints.all)

    def unfinished(self) -> int:
        """Requests sent and not finished, over all endpoints."""
        return self.endpoints.outstanding()

    def stats(self) -> dict[str, Any]:
        """Per endpoint: outstanding, requests, failures in a row, errors, ejected, ejections."""
        return {"backend": "openai", "model": self.model_name,
                "tokenizer": self.options.tokenizer or "local", "endpoints": self.endpoints.stats()}

    async def reset_prefix_cache(self) -> bool:
        """``POST /reset_prefix_cache`` on every healthy endpoint (vLLM's server has it with
        ``VLLM_SERVER_DEV_MODE=1``). False if any refused or could not (yet)."""
        eps = self.endpoints.healthy()
        return bool(eps) and all(await asyncio.gather(*(self._reset(ep) for ep in eps)))

    async def _reset(self, ep: Endpoint) -> bool:
        try:
            r = await self._client(ep).post("/reset_prefix_cache", timeout=self._short)
        except httpx.HTTPError:
            return False
        if r.status_code != 200:
            return False
        try:
            return bool(r.json().get("success", True))
        except (ValueError, AttributeError):
            return True  # a server that answers 200 with no JSON body has reset

    async def _probe(self, ep: Endpoint) -> bool:
        client = self._client(ep)
        r = await client.get("/health", timeout=self._short)
        if r.status_code == 404:  # not vLLM: any OpenAI-compatible server lists its models
            r = await client.get("/v1/models", timeout=self._short)
        return r.status_code == 200

    async def aclose(self) -> None:
        """Stop probing and close every connection (``RAG.close`` awaits this)."""
        await self.endpoints.stop()
        clients, self._clients = self._clients, {}
        await asyncio.gather(*(c.aclose() for c in clients.values()), return_exceptions=True)
        self._close_tokenizer()

    def shutdown(self) -> None:
        """``aclose`` for a caller without an event loop: connections are dropped, not closed
        politely, when no loop runs."""
        self.endpoints.stop_soon()
        clients, self._clients = self._clients, {}
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for c in clients.values():
            if loop is not None:
                loop.create_task(c.aclose())
        self._close_tokenizer()

    def _close_tokenizer(self) -> None:
        close = getattr(self._tokenizer, "close", None)
        if close is not None and getattr(self._tokenizer, "remote", False):
            close()

    def _client(self, ep: Endpoint) -> httpx.AsyncClient:
        if not self._clients:
            self.warm_up()
        return self._clients[ep.url]

    # -- generation --------------------------------------------------------------------

    async def generate(self, prompt: str, request_id: str, *,
                       token_ids: list[int] | None = None, priority: int = 0) -> Generation:
        """The whole answer (the stream, consumed)."""
        final = None
        async with aclosing(self.stream(prompt, request_id, token_ids=token_ids, deltas=False,
                                        priority=priority)) as pieces:
            async for piece in pieces:
                final = piece
        if not isinstance(final, Generation):
            raise GenerationError(f"request {request_id}: the stream ended without a result")
        return final

    async def stream(self, prompt: str, request_id: str, *, token_ids: list[int] | None = None,
                     deltas: bool = True, priority: int = 0) -> AsyncIterator[str | Generation]:
        """Yield text deltas as they arrive (unless ``deltas=False``), then the ``Generation``.
        ``priority`` goes to the server with ``generate.scheduling = "priority"``."""
        if not self._clients:
            self.warm_up()
        if not self.model_name:
            await self._ask_model()
        body = request_body(self.config, self.model_name, prompt, token_ids, priority)
        tried: list[Endpoint] = []
        problems: list[str] = []
        while len(tried) <= self.options.retries:
            ep = self.endpoints.pick(tried)
            if ep is None:
                break
            tried.append(ep)
            attempt = Attempt(time.perf_counter())
            try:
                async with aclosing(self._attempt(ep, body, request_id, attempt)) as pieces:
                    async for piece in pieces:
                        if deltas:
                            yield piece
            except _Retry as e:
                problems.append(str(e))
                log.info("request %s: %s; trying another endpoint", request_id, e)
                continue
            yield attempt.generation(token_ids)
            return
        ejected, total = sum(ep.ejected for ep in self.endpoints.all), len(self.endpoints.all)
        raise GeneratorUnavailableError(
            f"request {request_id}: no generator endpoint could take it ({len(problems)} tried, {ejected} of "
            f"{total} ejected until a probe finds them healthy): {'; '.join(problems) or 'none'}")

    async def _attempt(self, ep: Endpoint, body: dict[str, Any], request_id: str,
                       attempt: Attempt) -> AsyncIterator[str]:
        """One streamed completion on ``ep``: its text deltas; ``_Retry`` if it failed before
        its first chunk, ``GenerationError`` after."""
        pool = self.endpoints
        pool.begin(ep)
        try:
            async with self._client(ep).stream("POST", "/v1/completions", json=body,
                                               headers=_headers(request_id)) as response:
                if response.status_code != 200:
                    await self._refused(ep, response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # the blank line between events, comments, keep-alive pings
                    data = line[5:].strip()
                    if data == "[DONE]":
                        attempt.done = True
                        break
                    chunk = parse_chunk(data, shown_url(ep.url))
                    if "error" in chunk:
                        self._stream_error(ep, attempt, chunk["error"])
                    text = attempt.add(chunk)
                    if text:
                        yield text
            if not attempt.done:
                raise httpx.RemoteProtocolError("the stream ended before its `data: [DONE]`")
            pool.success(ep)
        except httpx.TransportError as e:  # connect/read/write errors and timeouts, a cut stream
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            pool.failure(ep, reason)
            if not attempt.started:
                raise _Retry(f"{shown_url(ep.url)}: {reason}") from e
            raise GenerationError(f"request {request_id}: the stream from {shown_url(ep.url)} broke after "
                                  f"{len(attempt.pieces)} pieces: {reason}") from e
        finally:
            pool.end(ep)

    async def _refused(self, ep: Endpoint, response: httpx.Response) -> NoReturn:
        """A non-200 answer: a 5xx counts against the endpoint and moves on, a 429 (busy)
        moves on, any other 4xx is this request's fault (no retry)."""
        try:
            detail = (await response.aread())[:300].decode("utf-8", "replace")
        except httpx.HTTPError:
            detail = ""
        status = response.status_code
        where = f"{shown_url(ep.url)} answered HTTP {status}"
        if status >= 500:
            self.endpoints.failure(ep, f"HTTP {status}")
            raise _Retry(f"{where}: {detail}")
        if status == 429:
            raise _Retry(f"{where} (busy): {detail}")
        raise GenerationError(f"{where}: {detail}")

    def _stream_error(self, ep: Endpoint, attempt: Attempt, error: Any) -> NoReturn:
        """An error event inside the stream (vLLM sends ``data: {"error": {...}}``)."""
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message", error) if isinstance(error, dict) else error
        where = f"{shown_url(ep.url)} failed the request: {message}"
        if isinstance(code, int) and code < 500:
            raise GenerationError(where)
        self.endpoints.failure(ep, f"error event: {message}")
        if not attempt.started:
            raise _Retry(where)
        raise GenerationError(where)

    async def _ask_model(self) -> None:
        """The served model's name from the first endpoint that lists one."""
        for ep in self.endpoints.healthy():
            try:
                r = await self._client(ep).get("/v1/models", timeout=self._short)
                models = r.json()["data"] if r.status_code == 200 else []
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                continue
            if models:
                self.model_name = str(models[0]["id"])
                return
        raise GeneratorUnavailableError("no generator endpoint listed a model at GET /v1/models "
                                        "(set openai.model)")


def _headers(request_id: str) -> dict[str, str]:
    """The request id, and the request's W3C ``traceparent`` when it is traced: the remote
    server's spans (vLLM's, with ``--otlp-traces-endpoint``) join the request's trace."""
    traceparent = traceparent_for(request_id)
    if traceparent is None:
        return {"X-Request-Id": request_id}
    return {"X-Request-Id": request_id, "traceparent": traceparent}
