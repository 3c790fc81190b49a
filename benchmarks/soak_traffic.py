"""What a soak sends (``Traffic``: the mix of kinds, their questions and variants) and how
each response is checked (``perform``); the run that drives them is ``soak.py``'s."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

KINDS = ("hit", "miss", "stream", "chat", "cancel", "deadline", "bad", "retrieve")
SLOW = frozenset({"miss", "stream", "chat", "cancel"})
"""Kinds that generate (seconds each on a CPU); the others take milliseconds."""
DEFAULT_MIX = {"hit": 30, "miss": 10, "stream": 8, "chat": 8, "cancel": 10, "deadline": 7, "bad": 19,
               "retrieve": 8}


@dataclass(frozen=True)
class Settings:
    """One soak run. Every bound is here: time, count, per-request time."""

    duration_s: float = 600.0
    """How long new requests are started; those in flight then finish (``request_timeout_s``)."""
    concurrency: int = 16
    """Workers, each with one request in flight at a time."""
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    """Relative weight of each kind (``KINDS``); missing kinds are not sent."""
    hot: int = 8
    """Questions in the hot set (asked before the run, then repeated: cache hits)."""
    max_generating: int = 0
    """Workers that may be in a generating kind (``SLOW``) at once; when all are busy, the
    others draw from the fast kinds, so hits and refusals keep flowing while the engine is
    saturated (0: half the workers)."""
    think_s: float = 0.05
    """Pause of a worker between two requests: a steady load, not a flood of L1 hits."""
    warmup_s: float = 60.0
    """RSS growth is counted from the sample at the end of this warm-up."""
    period_s: float = 60.0
    """One row of the table per period."""
    sample_s: float = 5.0
    """RSS and fds sampled this often."""
    request_timeout_s: float = 120.0
    max_requests: int = 500_000
    deadline_s: float = 0.05
    """``timeout_s`` of the deadline requests."""
    give_up_s: float = 0.3
    """The client timeout of a plain query the client abandons."""
    seed: int = 0
    namespace: str = ""
    """Cache namespace of native requests (default: a new one per run)."""


@dataclass(frozen=True)
class Call:
    """One request to send and what it must get back."""

    kind: str
    variant: str
    path: str
    body: Any
    """A JSON value, or bytes sent as they are (malformed JSON, raw escapes)."""
    expect: frozenset[int] = frozenset({200})
    error_type: str | None = None
    """The error type a refusal must name (None: any typed error)."""
    stream: str | None = None
    """``"native"`` or ``"chat"``: read the response as Server-Sent Events."""
    abandon: bool = False
    """Leave the stream after its first token (the connection closes)."""
    give_up_s: float | None = None
    """A client timeout: the client gives up (cancels) after this long."""
    content_type: str = "application/json"


@dataclass(frozen=True)
class Record:
    kind: str
    variant: str
    start_s: float
    end_s: float
    status: int | None
    outcome: str
    expected: bool
    detail: str = ""
    request_id: str = ""

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s


# -- what to send ------------------------------------------------------------------------


class Traffic:
    """Draws the next request: a seeded choice of kind, then its question or variant."""

    def __init__(self, questions: Sequence[str], s: Settings) -> None:
        if len(questions) < s.hot + 4:
            raise ValueError(f"need at least {s.hot + 4} questions, got {len(questions)}")
        unknown = set(s.mix) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds in the mix: {sorted(unknown)}; known: {', '.join(KINDS)}")
        self.s = s
        self.rng = random.Random(s.seed)
        self.hot = list(questions[: s.hot])
        self.pool = list(questions[s.hot:])
        self.kinds = [k for k in KINDS if s.mix.get(k, 0) > 0]
        self.weights = [s.mix[k] for k in self.kinds]
        self.fast = [k for k in self.kinds if k not in SLOW]
        self.fast_weights = [s.mix[k] for k in self.fast]
        self.cursor = 0
        self.n = Counter()

    def fresh(self) -> str:
        """The next pool question (the pool cycles: a later round may be a hit for chat)."""
        q = self.pool[self.cursor % len(self.pool)]
        self.cursor += 1
        return q

    def query(self, question: str, **extra: Any) -> dict[str, Any]:
        return {"question": question, "namespace": self.s.namespace, **extra}

    def next(self, fast_only: bool = False) -> Call:
        """The next request; ``fast_only``: none that generates."""
        if fast_only and self.fast:
            kind = self.rng.choices(self.fast, self.fast_weights)[0]
        else:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            if kind in SLOW:
                # NOTE: the generating kind furthest behind its share, not a random one: on a
                # slow machine a short run starts only a few of them, and each must be among them.
                kind = min((k for k in self.kinds if k in SLOW), key=lambda k: (self.n[k] + 1) / self.s.mix[k])
        self.n[kind] += 1  # variants of a kind take turns
        nocache = {"cache": {"read": False}}
        if kind == "hit":
            return Call(kind, "hot set", "/v1/query", self.query(self.rng.choice(self.hot)))
        if kind == "miss":
            return Call(kind, "read: false", "/v1/query", self.query(self.fresh(), **nocache))
        if kind == "stream":
            return Call(kind, "native", "/v1/query", self.query(self.fresh(), stream=True, **nocache),
                        stream="native")
        if kind == "chat":
            return Call(kind, "chat stream", "/v1/chat/completions", chat(self.fresh(), stream=True),
                        stream="chat")
        if kind == "cancel":
            which = self.n[kind] % 3
            if which == 0:
                return Call(kind, "native stream", "/v1/query", self.query(self.fresh(), stream=True, **nocache),
                            stream="native", abandon=True)
            if which == 1:
                return Call(kind, "chat stream", "/v1/chat/completions", chat(self.fresh(), stream=True),
                            stream="chat", abandon=True)
            return Call(kind, "plain, client gives up", "/v1/query", self.query(self.fresh(), **nocache),
                        give_up_s=self.s.give_up_s)
        if kind == "deadline":
            return Call(kind, f"timeout_s {self.s.deadline_s:g}", "/v1/query",
                        self.query(self.fresh(), timeout_s=self.s.deadline_s, **nocache),
                        expect=frozenset({504, 200}))
        if kind == "retrieve":
            return Call(kind, "top_k 5", "/v1/retrieve", {"question": self.fresh(), "top_k": 5})
        bad = bad_calls(self.rng.choice(self.hot), self.s.namespace)
        return bad[self.n[kind] % len(bad)]


def chat(question: str, **extra: Any) -> dict[str, Any]:
    return {"model": "ragserve", "messages": [{"role": "user", "content": question}], **extra}


def bad_calls(q: str, namespace: str) -> list[Call]:
    """Inputs the server must refuse with a 4xx and a typed error, never a 500."""
    ns = json.dumps(namespace)

    def bad(variant: str, body: Any, status: int, error: str | None = None, path: str = "/v1/query",
            content_type: str = "application/json") -> Call:
        return Call("bad", variant, path, body, frozenset({status}), error, content_type=content_type)

    return [
        bad("empty question", {"question": ""}, 400, "EmptyQuestionError"),
        bad("blank question", {"question": " \n\t "}, 400, "EmptyQuestionError"),
        # The escape goes out as written: json.dumps would send a valid pair, not a lone half.
        bad("lone surrogate", f'{{"question": "why \\ud800 here?", "namespace": {ns}}}'.encode(), 400,
            "InvalidTextError"),
        bad("control character", {"question": q + "\u001b[2J"}, 400, "InvalidTextError"),
        bad("too long", {"question": "why " * 600}, 400, "QuestionTooLongError"),
        bad("far too long", {"question": "x" * 20_000}, 400, "QuestionTooLongError"),
        bad("body over the limit", {"question": "x" * 70_000}, 413, "PayloadTooLarge"),
        bad("malformed JSON", b'{"question": "what is', 422, "InvalidRequest"),
        bad("not JSON", b"what is it?", 422, "InvalidRequest", content_type="text/plain"),
        bad("question not a string", {"question": 123}, 422, "InvalidRequest"),
        bad("question a list", {"question": [q]}, 422, "InvalidRequest"),
        bad("top_k a string", {"question": q, "top_k": "many"}, 422, "InvalidRequest"),
        bad("top_k 0", {"question": q, "top_k": 0}, 422, "InvalidRequest"),
        bad("cache.read a string", {"question": q, "cache": {"read": "maybe"}}, 422, "InvalidRequest"),
        bad("unknown field", {"question": q, "tpo_k": 3}, 422, "InvalidRequest"),
        bad("negative timeout_s", {"question": q, "timeout_s": -1}, 422, "InvalidRequest"),
        bad("retrieve: empty", {"question": ""}, 400, "EmptyQuestionError", "/v1/retrieve"),
        bad("retrieve: lone surrogate", b'{"question": "\\udfff"}', 400, "InvalidTextError", "/v1/retrieve"),
        bad("chat: unknown model", {**chat(q), "model": "gpt-4o"}, 404, "ModelNotFound", "/v1/chat/completions"),
        bad("chat: temperature", chat(q, temperature=1.7), 400, "InputError", "/v1/chat/completions"),
        bad("chat: no user message", {"model": "ragserve", "messages": [{"role": "system", "content": q}]}, 400,
            "InputError", "/v1/chat/completions"),
        bad("chat: no messages", {"model": "ragserve", "messages": []}, 422, "InvalidRequest",
            "/v1/chat/completions"),
        bad("chat: empty question", chat(""), 400, "EmptyQuestionError", "/v1/chat/completions"),
        bad("chat: stream, lone surrogate", b'{"model": "ragserve", "stream": true, "messages": '
            b'[{"role": "user", "content": "\\ud800"}]}', 400, "InvalidTextError", "/v1/chat/completions"),
        bad("chat: content part text not a string",
            {"model": "ragserve", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 422,
            "InvalidRequest", "/v1/chat/completions"),
    ]


# -- sending and checking ------------------------------------------------------------------


async def perform(client: httpx.AsyncClient, call: Call, t0: float, rid: str) -> Record:
    """Send ``call`` and check what comes back."""
    if isinstance(call.body, bytes):
        content, payload = call.body, None
    else:
        content, payload = None, call.body
    headers = {"X-Request-Id": rid, "Content-Type": call.content_type}
    start = time.perf_counter() - t0

    def done(status: int | None, outcome: str, expected: bool, detail: str = "") -> Record:
        end = time.perf_counter() - t0
        return Record(call.kind, call.variant, start, end, status, outcome, expected, detail, rid)

    timeout = httpx.Timeout(call.give_up_s) if call.give_up_s else httpx.USE_CLIENT_DEFAULT
    status = None
    try:
        async with client.stream("POST", call.path, content=content, json=payload, headers=headers,
                                 timeout=timeout) as r:
            status = r.status_code
            if r.status_code != 200 or call.stream is None:
                raw = await r.aread()
                return done(r.status_code, *check_body(call, r, raw))
            return done(r.status_code, *await check_stream(call, r))
    except httpx.TimeoutException as e:
        if call.give_up_s:
            return done(None, "client gave up", True)
        return done(None, f"client timeout ({type(e).__name__})", False, repr(e))
    except httpx.HTTPError as e:
        return done(status, f"transport: {type(e).__name__}", False, repr(e))
    except (ValueError, LookupError, TypeError, AttributeError) as e:  # a body or frame not as documented
        return done(status, f"malformed response: {type(e).__name__}", False, repr(e)[:300])


def check_body(call: Call, r: httpx.Response, raw: bytes) -> tuple[str, bool, str]:
    """(outcome, expected, detail) of a response read whole."""
    status = r.status_code
    try:
        data = json.loads(raw)
    except ValueError:
        return f"{status} not JSON", False, raw[:300].decode("utf-8", "replace")
    if status != 200:
        err = data.get("error") if isinstance(data, dict) else None
        typed = isinstance(err, dict) and all(isinstance(err.get(k), str) and err.get(k) for k in
                                               ("type", "message", "stage"))
        if not typed:
            return f"{status} untyped error body", False, raw[:300].decode("utf-8", "replace")
        outcome = f"{status} {err['type']}"
        ok = status in call.expect and (call.error_type is None or err["type"] == call.error_type)
        return outcome, ok, "" if ok else err["message"][:300]
    ok = status in call.expect
    if not isinstance(data, dict):
        return "200 not a JSON object", False, raw[:300].decode("utf-8", "replace")
    if call.path == "/v1/retrieve":
        sources = data.get("sources")
        return ("200" if sources else "200 no sources"), ok and bool(sources), ""
    answer_ok = isinstance(data.get("answer"), str) and isinstance(data.get("sources"), list)
    tier = r.headers.get("x-cache", "?")
    outcome = f"200 {tier}" if call.kind != "deadline" else f"200 {tier} (beat the deadline)"
    return outcome, ok and answer_ok, "" if answer_ok else raw[:300].decode("utf-8", "replace")


async def check_stream(call: Call, r: httpx.Response) -> tuple[str, bool, str]:
    """Read a 200 stream: native ``sources, token..., done``; chat chunks then ``[DONE]``."""
    tier = r.headers.get("x-cache", "?")
    event, events, tokens = None, [], 0
    async for line in r.aiter_lines():
        if line.startswith("event: "):
            event = line[7:]
            continue
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if call.stream == "native":
            events.append(event)
            if event == "error":
                return f"stream error {json.loads(data)['error'].get('type')}", False, data[:300]
            tokens += event == "token"
        else:
            if data == "[DONE]":
                events.append("[DONE]")
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                return f"stream error {chunk['error'].get('type')}", False, data[:300]
            events.append("chunk")
            tokens += any(c.get("delta", {}).get("content") for c in chunk.get("choices") or [])
        event = None
        if call.abandon and tokens:
            return "abandoned after the first token", True, ""
    if call.abandon:
        return f"ended before a token ({tier})", True, ""  # a cached answer can come as one block
    last = "done" if call.stream == "native" else "[DONE]"
    first_ok = call.stream == "chat" or (events[:1] == ["sources"])
    if events[-1:] != [last] or not first_ok:
        return "stream cut short", False, f"events: {events[:3]}...{events[-3:]}"
    return f"200 {tier}", True, ""
