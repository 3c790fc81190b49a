"""A fake OpenAI-compatible server for the ``openai`` backend's tests: vLLM's routes and its
SSE format for ``POST /v1/completions`` over a word-level "model", served by the real
uvicorn on a loopback port (``ragserve.testing.http.running``). ``POST /v1/chat/completions``
answers without streaming, for clients such as LangChain's ``ChatOpenAI``.

The reply to any prompt is ``reply``, one word per chunk. Knobs (attributes of
``FakeOpenAI.b``, changeable while it runs) make it slow, failing, dying mid-stream,
stalling, held or unhealthy; counters say what it saw (bodies, disconnects, probes).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


@dataclass
class Behaviour:
    name: str = "fake-model"
    reply: str = "an answer from the fake server"
    token_delay_s: float = 0.0
    """Between chunks; a prompt with the word "slow" in it waits ``slow_delay_s`` instead."""
    slow_delay_s: float = 0.3
    header_delay_s: float = 0.0
    """Before the response starts (a long queue + prefill)."""
    status: int = 200
    """Not 200: every completion is answered with this status and an error body."""
    refuse_word: str | None = None
    """A prompt with this word in it is refused with HTTP 400 (the request's own fault: the
    client neither retries it nor counts it against the server); the others are answered."""
    die_after: int | None = None
    """Chunks sent before the connection is cut (the handler raises mid-stream)."""
    stall_after: int | None = None
    """Chunks sent before the stream goes silent for an hour."""
    hold: bool = False
    """While True, every stream waits before its next chunk (``in_flight`` counts it): a
    test keeps requests in flight for as long as it needs, then clears it."""
    healthy: bool = True
    """``GET /health``: 200 or 503."""
    metrics: dict[str, float] | None = None
    """Per-request times on the final usage chunk (vLLM's --enable-per-request-metrics)."""
    dev_mode: bool = True
    """``POST /reset_prefix_cache`` exists (vLLM: VLLM_SERVER_DEV_MODE=1)."""
    max_model_len: int = 2048


@dataclass
class FakeOpenAI:
    b: Behaviour = field(default_factory=Behaviour)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    chat_bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    completed: int = 0
    disconnects: int = 0
    died: int = 0
    probes: int = 0
    words: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.app = self._app()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Streams wait (``b.hold``) for the block and go on when it ends, however it ends.
        Put it inside the pool that sends the requests, so a failed wait inside it lets
        them go before the pool waits for them:

            with ThreadPoolExecutor(4) as pool:
                with fake.held():
                    futures = [pool.submit(ask, q) for q in questions]
                    eventually(...)  # what the hold is for
                results = [f.result() for f in futures]
        """
        self.b.hold = True
        try:
            yield
        finally:
            self.b.hold = False

    # -- the word-level tokenizer ------------------------------------------------------

    def ids(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            out.append(self.vocab[w])
        return out

    def text(self, ids: list[int]) -> str:
        return " ".join(self.words[i] if i < len(self.words) else f"<{i}>" for i in ids)

    @staticmethod
    def render(messages: list[dict[str, str]]) -> str:
        """The chat template (the same as tests/test_prompt.WordTokenizer's)."""
        return "".join(f"<{m['role']}> {m['content']} </{m['role']}> " for m in messages) + "<assistant>"

    def prompt_text(self, prompt: Any) -> str:
        return self.text(prompt) if isinstance(prompt, list) else str(prompt)

    # -- the app -----------------------------------------------------------------------

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            self.probes += 1
            return Response(status_code=200 if self.b.healthy else 503)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.b.name, "object": "model",
                                                "max_model_len": self.b.max_model_len}]}

        @app.post("/tokenize")
        async def tokenize(request: Request) -> dict[str, Any]:
            body = await request.json()
            text = self.render(body["messages"]) if "messages" in body else body["prompt"]
            ids = self.ids(text)
            return {"count": len(ids), "max_model_len": self.b.max_model_len, "tokens": ids}

        @app.post("/detokenize")
        async def detokenize(request: Request) -> dict[str, Any]:
            return {"prompt": self.text((await request.json())["tokens"])}

        @app.post("/reset_prefix_cache")
        async def reset() -> Response:
            if not self.b.dev_mode:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            return JSONResponse({"success": True})

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            body = await request.json()
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
            if self.b.header_delay_s:
                await asyncio.sleep(self.b.header_delay_s)
            if self.b.status != 200:
                return JSONResponse({"error": {"message": "the fake server fails", "code": self.b.status}},
                                    status_code=self.b.status)
            if body.get("model") != self.b.name:
                error = {"message": f"model {body.get('model')!r} not found", "code": 404}
                return JSONResponse({"error": error}, status_code=404)
            if self.b.refuse_word and self.b.refuse_word in self.prompt_text(body["prompt"]).split():
                message = f"the fake server refuses prompts with {self.b.refuse_word!r}"
                return JSONResponse({"error": {"message": message, "code": 400}}, status_code=400)
            return StreamingResponse(self._events(body), media_type="text/event-stream")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            self.chat_bodies.append(body)
            if self.b.header_delay_s:
                await asyncio.sleep(self.b.header_delay_s)
            if self.b.status != 200:
                return JSONResponse({"error": {"message": "the fake server fails", "code": self.b.status}},
                                    status_code=self.b.status)
            if body.get("model") != self.b.name or body.get("stream"):
                error = {"message": f"model {body.get('model')!r} not found, or stream asked", "code": 404}
                return JSONResponse({"error": error}, status_code=404)
            limit = body.get("max_completion_tokens") or body.get("max_tokens") or 1 << 30
            words = self.b.reply.split()[:limit]
            n_prompt = len(self.ids(self.render(body["messages"])))
            self.completed += 1
            finish = "length" if len(words) == limit else "stop"
            return JSONResponse({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": self.b.name,
                "choices": [{"index": 0, "finish_reason": finish,
                             "message": {"role": "assistant", "content": " ".join(words)}}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(words),
                          "total_tokens": n_prompt + len(words)}})

        return app

    async def _events(self, body: dict[str, Any]):
        prompt = self.prompt_text(body["prompt"])
        words = self.b.reply.split()[: body["max_tokens"]]
        delay = self.b.slow_delay_s if "slow" in prompt.split() else self.b.token_delay_s
        n_prompt = len(body["prompt"]) if isinstance(body["prompt"], list) else len(prompt.split())
        self.in_flight += 1
        done = False
        try:
            for i, word in enumerate(words):
                if self.b.die_after is not None and i == self.b.die_after:
                    self.died += 1
                    raise RuntimeError("the fake server dies mid-stream")
                if self.b.stall_after is not None and i == self.b.stall_after:
                    await asyncio.sleep(3600)
                while self.b.hold:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(delay)
                last = i == len(words) - 1
                finish = ("length" if len(words) == body["max_tokens"] else "stop") if last else None
                choice = {"index": 0, "text": (" " if i else "") + word, "finish_reason": finish}
                yield _sse({"id": "cmpl-1", "object": "text_completion", "model": self.b.name,
                            "choices": [choice]})
            usage = {"prompt_tokens": n_prompt, "completion_tokens": len(words),
                     "total_tokens": n_prompt + len(words)}
            final: dict[str, Any] = {"id": "cmpl-1", "object": "text_completion", "model": self.b.name,
                                     "choices": [], "usage": usage}
            if self.b.metrics:
                final["metrics"] = self.b.metrics
            yield _sse(final)
            yield "data: [DONE]\n\n"
            done = True
        finally:
            self.in_flight -= 1
            if done:
                self.completed += 1
            elif not (self.b.die_after is not None):
                self.disconnects += 1


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
