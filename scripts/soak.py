"""Soak run of ``ragserve serve`` (issues 11 and 16): a long, bounded, mixed workload with
the server's memory and open file descriptors sampled, and every response checked.

What it sends, from ``--concurrency`` workers for ``--minutes`` (the mix is ``--mix``):

- ``hit``: a question from a small hot set, asked once before the run (L1 hits);
- ``miss``: a question with ``cache: {read: false}`` (a real generation every time);
- ``stream`` / ``chat``: ``/v1/query`` and ``/v1/chat/completions`` as Server-Sent
  Events, read to the end (the last event must be ``done`` / ``[DONE]``);
- ``cancel``: a stream (native or chat) the client leaves after its first token, or a
  plain query it gives up on after 0.3 s: the server must abort the vLLM request;
- ``deadline``: ``timeout_s`` of 0.05 s with the cache off: 504 (200 if it beat it);
- ``bad``: empty, blank, lone surrogate (``"\\ud800"`` in the JSON), control character,
  too long, body over the limit, malformed JSON, wrong types, unknown fields, refused
  chat options: the 4xx named for each, with ``{"error": {"type", "message", "stage"}}``;
- ``retrieve``: ``/v1/retrieve``.

At most ``--max-generating`` workers (default: half) are in a generating kind (miss,
stream, chat, cancel) at once; the others then send the fast kinds, so hits, refusals and
retrievals keep flowing while the engine is saturated. Generating kinds take turns by
weight (a short run on a slow machine still sends each of them).

A response is *unexpected* when its status is not the one its request must get, an error
body is not the typed error JSON (or names another error type), or a 200 stream ends in
an error or without its last event. A 500 is always a bug. Native requests use their own
cache namespace, so answers cached before the run cannot turn its misses into hits.

Sampled every ``--sample-s`` seconds with psutil: the server process's RSS and open fds,
and its child processes' RSS (the vLLM engine core; the embedded Redis apart); from
``/metrics``, the requests the vLLM engine holds. Reported:
one markdown row per minute (requests by kind with p50/p99 latency, outcomes, RSS, fds),
the outcomes of the whole run, and a summary: RSS growth from the end of the first minute
(warm-up) to the end of the run, fd growth idle-to-idle (after priming, after the run),
requests still in flight on the server and held by vLLM after the run (abandoned and
timed-out requests must have been aborted), 500s and unexpected statuses.

By default it starts ``ragserve serve INDEX`` itself on 127.0.0.1 (port 0, its own
``RAGSERVE_HOME`` in a temp dir, so its embedded Redis starts empty), and stops it with
SIGTERM at the end (it must drain and exit 0). ``--url`` drives a server already running
on this machine instead (``--pid`` to sample it). Exit status 1 on any 500, unexpected
response, request left in flight or in vLLM, server exit other than 0 or, with
``--max-rss-growth-mb``, more growth than that.

Run (from the repo root; the index is built from XQuAD into ``indexes/xquad`` if missing):

    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false .venv/bin/python scripts/soak.py \\
        --minutes 10 --concurrency 16 --max-rss-growth-mb 50 --out reports/soak.md
    .venv/bin/python scripts/soak.py --minutes 1 --concurrency 8   # a quick look

The driver (``run``, ``report``) is what ``tests/test_soak.py`` runs for ~40 s in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
KINDS = ("hit", "miss", "stream", "chat", "cancel", "deadline", "bad", "retrieve")
SLOW = frozenset({"miss", "stream", "chat", "cancel"})
"""Kinds that generate (seconds each on a CPU); the others take milliseconds."""
DEFAULT_MIX = {"hit": 30, "miss": 10, "stream": 8, "chat": 8, "cancel": 10, "deadline": 7, "bad": 19,
               "retrieve": 8}
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
MB = 2**20


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


@dataclass(frozen=True)
class Sample:
    t_s: float
    rss_server: int
    rss_engine: int
    """Child processes other than Redis (the vLLM engine core)."""
    rss_redis: int
    fds: int
    children: int


@dataclass
class Result:
    settings: Settings
    url: str
    records: list[Record]
    samples: list[Sample]
    before: Sample | None
    """Idle, after the hot set was primed and before the run."""
    after: Sample | None
    """Idle, after the run (client closed, requests done)."""
    in_flight_after: int | None
    wall_s: float
    held: list[tuple[float, int]] = field(default_factory=list)
    """(t, requests the vLLM engine holds), from ``/metrics`` at every sample: never more
    than the generating workers, give or take a request being aborted."""
    held_after: int | None = None
    """Requests vLLM still holds after the run (abandoned ones must have been aborted)."""

    @property
    def errors_500(self) -> list[Record]:
        return [r for r in self.records if r.status == 500]

    @property
    def unexpected(self) -> list[Record]:
        return [r for r in self.records if not r.expected]

    def warm(self) -> Sample | None:
        """The sample at the end of the warm-up (the first one if the run is shorter)."""
        warm = [s for s in self.samples if s.t_s <= self.settings.warmup_s]
        return warm[-1] if warm else (self.samples[0] if self.samples else None)

    def last(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def rss_growth(self) -> tuple[int, int] | None:
        """(server, engine) RSS growth in bytes, end of warm-up → last sample of the run."""
        w, e = self.warm(), self.last()
        return None if w is None or e is None else (e.rss_server - w.rss_server, e.rss_engine - w.rss_engine)

    def fd_growth(self) -> int | None:
        """Open fds after the run minus before it, both idle."""
        return None if self.before is None or self.after is None else self.after.fds - self.before.fds


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


# -- sampling ------------------------------------------------------------------------------


class Sampler:
    """RSS and fds of one process (the server), and the RSS of its children."""

    def __init__(self, pid: int | None) -> None:
        import psutil

        self.psutil = psutil
        self.proc = psutil.Process(pid) if pid else None

    def sample(self, t_s: float) -> Sample | None:
        if self.proc is None:
            return None
        ps = self.psutil
        try:
            rss, fds = self.proc.memory_info().rss, self.proc.num_fds()
            children = self.proc.children(recursive=True)
        except ps.Error:
            return None
        engine = redis = 0
        for c in children:
            try:
                mem = c.memory_info().rss
                if "redis" in c.name():
                    redis += mem
                else:
                    engine += mem
            except ps.Error:  # a child that ended between the listing and the read
                continue
        return Sample(t_s, rss, engine, redis, fds, len(children))


# -- the run -------------------------------------------------------------------------------


async def run(url: str, questions: Sequence[str], s: Settings, pid: int | None = None,
              log: Callable[[str], None] = print) -> Result:
    """Drive ``url`` with the mixed workload of ``s``; sample process ``pid`` (the server)."""
    if not s.namespace:
        s = dataclasses.replace(s, namespace=f"soak-{uuid.uuid4().hex[:12]}")
    traffic = Traffic(questions, s)
    sampler = Sampler(pid)
    limits = httpx.Limits(max_connections=2 * s.concurrency, max_keepalive_connections=2 * s.concurrency)
    records: list[Record] = []
    samples: list[Sample] = []
    async with httpx.AsyncClient(base_url=url, timeout=s.request_timeout_s, limits=limits) as client:
        await _wait_ready(client)
        t = time.perf_counter()
        primed = await asyncio.gather(*(client.post("/v1/query", json=traffic.query(q)) for q in traffic.hot))
        bad = [r.status_code for r in primed if r.status_code != 200]
        if bad:
            raise RuntimeError(f"priming the hot set failed: statuses {bad}")
        log(f"hot set of {len(traffic.hot)} primed in {time.perf_counter() - t:.1f} s; "
            f"namespace {s.namespace}; running {s.duration_s:.0f} s at concurrency {s.concurrency}, at most "
            f"{s.max_generating or max(1, s.concurrency // 2)} of them generating")
    await asyncio.sleep(1.0)  # the primer's connections closed
    before = sampler.sample(0.0)
    t0 = time.perf_counter()
    stop_at = t0 + s.duration_s
    counter = iter(range(s.max_requests))

    held: list[tuple[float, int]] = []

    async def sample_loop() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as metrics:
            while True:
                t = time.perf_counter() - t0
                got = sampler.sample(t)
                if got is not None:
                    samples.append(got)
                n = await engine_held(metrics)
                if n is not None:
                    held.append((t, n))
                await asyncio.sleep(s.sample_s)

    slow_slots = s.max_generating or max(1, s.concurrency // 2)
    generating = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal generating
        while time.perf_counter() < stop_at:
            n = next(counter, None)
            if n is None:
                return
            call = traffic.next(fast_only=generating >= slow_slots)
            slow = call.kind in SLOW
            generating += slow
            try:
                records.append(await perform(client, call, t0, f"soak-{n}"))
            finally:
                generating -= slow
            if s.think_s:
                await asyncio.sleep(s.think_s)

    async def progress() -> None:
        shown = 0
        while True:
            await asyncio.sleep(s.period_s)
            rows = records[shown:]
            shown += len(rows)
            last = samples[-1] if samples else None
            mem = f"; RSS server {last.rss_server / MB:.0f} MB, engine {last.rss_engine / MB:.0f} MB, " \
                  f"fds {last.fds}" if last else ""
            log(f"  {time.perf_counter() - t0:5.0f} s: {len(rows)} requests, {sum(not r.expected for r in rows)} "
                f"unexpected, {sum(r.status == 500 for r in rows)} × 500{mem}")

    background = [asyncio.ensure_future(sample_loop()), asyncio.ensure_future(progress())]
    try:
        async with httpx.AsyncClient(base_url=url, timeout=s.request_timeout_s, limits=limits) as client:
            await asyncio.gather(*(worker(client) for _ in range(s.concurrency)))
            last = sampler.sample(time.perf_counter() - t0)  # the end of the run, still under its last load
            if last is not None:
                samples.append(last)
    finally:
        for task in background:
            task.cancel()
    wall = time.perf_counter() - t0
    in_flight, held_after = await _settled(url)
    await asyncio.sleep(1.0)
    after = sampler.sample(time.perf_counter() - t0)
    return Result(s, url, records, samples, before, after, in_flight, wall, held, held_after)


async def _wait_ready(client: httpx.AsyncClient, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await client.get("/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{client.base_url} is not ready after {timeout_s:.0f} s")
        await asyncio.sleep(0.5)


async def engine_held(client: httpx.AsyncClient) -> int | None:
    """``ragserve_engine_unfinished_requests`` from ``/metrics`` (None if not exported)."""
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    for line in r.text.splitlines():
        if line.startswith("ragserve_engine_unfinished_requests "):
            return int(float(line.split()[1]))
    return None


async def _settled(url: str, timeout_s: float = 15.0) -> tuple[int | None, int | None]:
    """(requests the server counts in flight, requests vLLM holds) after the run, once both
    are 0 or ``timeout_s`` has passed: what is left then has leaked."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while True:
            r = await client.get("/v1/stats")
            n = r.json().get("gauges", {}).get("in_flight", {}).get("current") if r.status_code == 200 else None
            held = await engine_held(client)
            if (not n and not held) or time.monotonic() > deadline:
                return n, held
            await asyncio.sleep(0.25)


# -- the report ----------------------------------------------------------------------------


def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no data)."""
    if not xs:
        return 0.0
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, math.ceil(q / 100 * len(ys)) - 1))]


def _ms(x: float) -> str:
    return f"{x * 1e3:.0f}" if x >= 0.01 else f"{x * 1e3:.1f}"


def _mb(x: int | None) -> str:
    return "n/a" if x is None else f"{x / MB:.0f}"


def report(res: Result) -> str:
    """The markdown report: one row per period, outcomes per kind, the summary."""
    s = res.settings
    kinds = [k for k in KINDS if any(r.kind == k for r in res.records)]
    periods = max(1, math.ceil(s.duration_s / s.period_s - 1e-9))  # what ends after the run: in the last row
    by_period: dict[int, list[Record]] = defaultdict(list)
    for r in res.records:
        by_period[min(periods - 1, int(r.end_s // s.period_s))].append(r)
    unit = "minute" if s.period_s == 60 else f"{s.period_s:g} s period"
    lines = [f"Per {unit}: requests and p50/p99 latency in ms by kind (for `cancel`: until the client "
             "left); RSS in MB at the period's last sample (server process; its children but Redis: the vLLM "
             "engine core; the embedded Redis)", "",
             f"| {unit} | requests | " + " | ".join(f"{k} n · p50/p99" for k in kinds)
             + " | unexpected | 500 | RSS server | RSS engine | RSS redis | fds | vLLM held (max) |",
             "|---" * (len(kinds) + 9) + "|"]
    for p in range(periods):
        rows = by_period.get(p, [])
        cells = []
        for k in kinds:
            lat = [r.latency_s for r in rows if r.kind == k]
            cells.append(f"{len(lat)} · {_ms(pct(lat, 50))}/{_ms(pct(lat, 99))}" if lat else "0")
        end = (p + 1) * s.period_s
        smp = [x for x in res.samples if x.t_s <= end + s.sample_s / 2]
        last = smp[-1] if smp else None
        mem = ([_mb(last.rss_server), _mb(last.rss_engine), _mb(last.rss_redis), str(last.fds)] if last
               else ["n/a"] * 4)
        held = [n for t, n in res.held if p * s.period_s <= t < end]
        lines.append(f"| {p + 1} | {len(rows)} | " + " | ".join(cells)
                     + f" | {sum(not r.expected for r in rows)} | {sum(r.status == 500 for r in rows)} | "
                     + " | ".join(mem) + f" | {max(held) if held else 'n/a'} |")
    lines += ["", "Outcomes of the whole run, by kind (unexpected ones marked ✗):", "",
              "| kind | requests | p50 ms | p99 ms | outcomes |", "|---|---|---|---|---|"]
    for k in kinds:
        rows = [r for r in res.records if r.kind == k]
        lat = [r.latency_s for r in rows]
        outcomes = Counter((r.outcome, r.expected) for r in rows)
        text = ", ".join(f"{o}{'' if ok else ' ✗'}: {n}" for (o, ok), n in outcomes.most_common())
        lines.append(f"| {k} | {len(rows)} | {_ms(pct(lat, 50))} | {_ms(pct(lat, 99))} | {text} |")
    lines += ["", *summary_lines(res)]
    problems = res.unexpected
    if problems:
        lines += ["", f"Unexpected responses ({len(problems)}; at most 20 shown, by the request id the server "
                  "logs):", ""]
        for r in problems[:20]:
            lines.append(f"- `{r.request_id}` {r.kind} / {r.variant}: {r.outcome}; {r.detail}")
    return "\n".join(lines)


def summary_lines(res: Result) -> list[str]:
    s = res.settings
    n = len(res.records)
    growth, warm, last = res.rss_growth(), res.warm(), res.last()
    out = [f"- **Requests**: {n} in {res.wall_s:.0f} s ({n / max(res.wall_s, 1e-9):.1f}/s) at concurrency "
           f"{s.concurrency}; **500s: {len(res.errors_500)}**; unexpected responses: {len(res.unexpected)}"]
    if growth is not None and warm is not None and last is not None:
        out.append(f"- **RSS growth** from {warm.t_s:.0f} s (end of the warm-up) to {last.t_s:.0f} s: server "
                   f"{growth[0] / MB:+.1f} MB ({warm.rss_server / MB:.0f} → {last.rss_server / MB:.0f}), engine "
                   f"{growth[1] / MB:+.1f} MB ({warm.rss_engine / MB:.0f} → {last.rss_engine / MB:.0f}), Redis "
                   f"{(last.rss_redis - warm.rss_redis) / MB:+.1f} MB; server peak "
                   f"{max(x.rss_server for x in res.samples) / MB:.0f} MB; {len(res.samples)} samples every "
                   f"{s.sample_s:g} s")
    else:
        out.append("- **RSS**: not sampled (no server process id)")
    if res.before is not None and res.after is not None:
        peak = max(x.fds for x in res.samples) if res.samples else res.after.fds
        out.append(f"- **Open fds** (server process) idle before → idle after the run: {res.before.fds} → "
                   f"{res.after.fds} ({res.fd_growth():+d}); peak under load {peak}; child processes "
                   f"{res.before.children} → {res.after.children}")
    slots = s.max_generating or max(1, s.concurrency // 2)
    peak = max((n for _, n in res.held), default=None)
    out.append(f"- **After the run**: {res.in_flight_after} requests in flight on the server, {res.held_after} "
               f"held by vLLM (abandoned ones aborted); vLLM held at most {peak} during the run, with at most "
               f"{slots} generating workers")
    return out


def failures(res: Result, max_rss_growth_mb: float | None = None) -> list[str]:
    """Why the run failed ([] if it did not)."""
    why = []
    if res.errors_500:
        why.append(f"{len(res.errors_500)} responses with status 500")
    if res.unexpected:
        why.append(f"{len(res.unexpected)} unexpected responses")
    if res.in_flight_after not in (0, None):
        why.append(f"{res.in_flight_after} requests still in flight after the run")
    if res.held_after not in (0, None):
        why.append(f"{res.held_after} requests still held by vLLM after the run")
    growth = res.rss_growth()
    if max_rss_growth_mb is not None and growth is not None and growth[0] / MB > max_rss_growth_mb:
        why.append(f"server RSS grew {growth[0] / MB:.1f} MB (limit {max_rss_growth_mb:g} MB)")
    return why


# -- the script: a server of its own, the run, SIGTERM ----------------------------------------


def start_server(index: Path, tmp: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str, Path]:
    """``ragserve serve INDEX`` on 127.0.0.1, port 0, ``RAGSERVE_HOME`` in ``tmp``; its output
    goes to a file (a pipe nobody reads would fill up and stall it)."""
    from ragserve.models import resolve_generation_model

    ready, log_path = tmp / "ready", tmp / "server.log"
    env = {**os.environ, "RAGSERVE_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAGSERVE_GENERATE_MAX_TOKENS": str(args.max_tokens),
           "RAGSERVE_VLLM_KV_CACHE_GIB": str(args.kv_cache_gib),
           # The prepared models live in the user's RAGSERVE_HOME; this one holds only the server's data.
           "RAGSERVE_GENERATE_MODEL": str(resolve_generation_model("default"))}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ragserve.cli", "serve", str(index), "--host", "127.0.0.1",
                                 "--port", "0", "--grace", str(args.grace), "--ready-file", str(ready)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 300
    while not (ready.is_file() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start:\n{tail(log_path)}")
        time.sleep(0.2)
    return proc, f"http://127.0.0.1:{ready.read_text().strip()}", log_path


def stop_server(proc: subprocess.Popen, grace_s: float) -> tuple[int | None, float]:
    """SIGTERM, then wait for the drain; (exit status or None if it had to be killed, seconds)."""
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=grace_s + 60), time.perf_counter() - t
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None, time.perf_counter() - t


def tail(path: Path, n: int = 60) -> str:
    lines = path.read_text("utf-8", "replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-n:])


def parse_mix(text: str) -> dict[str, float]:
    mix = dict(DEFAULT_MIX)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in KINDS or not weight:
            raise argparse.ArgumentTypeError(f"--mix: {part!r} is not KIND=WEIGHT with KIND in {', '.join(KINDS)}")
        mix[name] = float(weight)
    return mix


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="drive this running server (loopback only) instead of starting one")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, to sample its RSS and fds")
    ap.add_argument("--index", type=Path, default=REPO / "indexes" / "xquad",
                    help="index to serve (built from all XQuAD paragraphs if missing)")
    ap.add_argument("--xquad", type=Path, default=REPO.parent / "shared" / "data" / "xquad-en" / "xquad.en.json")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-generating", type=int, default=0,
                    help="workers in a generating kind at once (default: half); the rest send fast kinds")
    ap.add_argument("--mix", type=parse_mix, default=dict(DEFAULT_MIX),
                    help=f"weights per kind, e.g. 'hit=50,bad=5' (default {DEFAULT_MIX})")
    ap.add_argument("--hot", type=int, default=8, help="questions in the hot set (cache hits)")
    ap.add_argument("--think-ms", type=float, default=50.0, help="pause of each worker between requests")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--warmup-s", type=float, help="RSS growth is counted from here (default: the first minute, "
                    "or half the run if it is shorter than two minutes)")
    ap.add_argument("--max-requests", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=32, help="generate.max_tokens of the server started here")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="vllm.kv_cache_gib of the server")
    ap.add_argument("--grace", type=float, default=30.0, help="the server's drain grace after SIGTERM")
    ap.add_argument("--max-rss-growth-mb", type=float, help="fail if the server's RSS grows more (issue 11: 50)")
    ap.add_argument("--out", type=Path, help="also write the report here (markdown)")
    args = ap.parse_args(argv)
    if args.url and httpx.URL(args.url).host not in LOOPBACK:
        ap.error(f"--url must be a loopback address ({', '.join(LOOPBACK)}): a soak is not for other machines")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))  # this checkout's ragserve, and the scripts folder (below) for the workload
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_serving_workload as wl

    from ragserve.config import RAGConfig
    from ragserve.profiling.env import environment, header_markdown

    env = environment()  # before the run: its load average is the machine's, not ours
    questions = [q.text for q in wl.load_questions(args.xquad)]
    random.Random(args.seed).shuffle(questions)
    s = Settings(duration_s=args.minutes * 60, concurrency=args.concurrency, max_generating=args.max_generating,
                 mix=args.mix, hot=args.hot, think_s=args.think_ms / 1e3,
                 warmup_s=args.warmup_s or min(60.0, args.minutes * 30), sample_s=args.sample_s,
                 max_requests=args.max_requests, seed=args.seed)
    settings = {"minutes": f"{args.minutes:g}", "concurrency": s.concurrency,
                "generating at most": s.max_generating or max(1, s.concurrency // 2),
                "think time": f"{args.think_ms:g} ms",
                "mix (weights)": ", ".join(f"{k} {w:g}" for k, w in s.mix.items() if w),
                "hot set": s.hot, "questions": f"{len(questions)} distinct XQuAD questions",
                "sampled every": f"{s.sample_s:g} s", "warm-up": f"{s.warmup_s:g} s"}
    proc = log_path = None
    with tempfile.TemporaryDirectory(prefix="ragserve-soak-") as tmp:
        if args.url:
            url, pid = args.url.rstrip("/"), args.pid
            settings["server"] = f"{url} (running; pid {pid or 'not given: no sampling'})"
        else:
            note = wl.ensure_index(args.index, args.xquad, RAGConfig.load())
            proc, url, log_path = start_server(args.index, Path(tmp), args)
            pid = proc.pid
            settings.update({"server": f"`ragserve serve` pid {pid} at {url}; its own RAGSERVE_HOME (empty Redis)",
                             "index": note, "generate": f"max_tokens {args.max_tokens}, KV cache "
                             f"{args.kv_cache_gib:g} GiB", "drain grace": f"{args.grace:g} s"})
        print(f"# Soak: {args.minutes:g} min of mixed traffic against ragserve serve\n", flush=True)
        print(header_markdown(env, settings), flush=True)
        try:
            res = asyncio.run(run(url, questions, s, pid, log=lambda m: print(m, flush=True)))
        finally:
            if proc is not None and proc.poll() is None and sys.exc_info()[0] is not None:
                proc.kill()
        text = report(res)
        why = failures(res, args.max_rss_growth_mb)
        if proc is not None:
            status, took = stop_server(proc, args.grace)
            shown = status if status is not None else "none (killed)"
            text += f"\n- **SIGTERM**: the server exited with status {shown} after {took:.1f} s"
            if status != 0:
                why.append(f"the server exited with {status} after SIGTERM")
        text += f"\n\n**{'FAILED: ' + '; '.join(why) if why else 'PASSED'}**\n"
        print("\n" + text, flush=True)
        if log_path is not None and why:
            print(f"\nLast lines of the server's log:\n```\n{tail(log_path)}\n```", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(f"# Soak\n\n{header_markdown(env, settings)}\n{text}", encoding="utf-8")
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
