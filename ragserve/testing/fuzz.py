"""Hostile requests for the three answering endpoints (``/v1/query``, ``/v1/retrieve``,
``/v1/chat/completions``), sent as raw bytes over loopback, and what a server must answer.

``requests(seed, n, key)`` draws ``n`` requests from ``random.Random(seed)`` (the same seed,
the same bytes): valid bodies, fields of the wrong type, missing and unknown fields,
hostile strings (huge, every Unicode plane, lone surrogates, control characters, NUL),
malformed JSON and bytes that are not UTF-8, and bad headers (content types, lengths that
lie, chunked bodies, odd or invalid header bytes, a wrong key, request ids that must not be
echoed). ``run`` sends them, ``problem`` judges each answer:

- a 2xx (its JSON parses; a stream ends with its last event) or a 4xx with the typed error
  body ``{"error": {"type", "message", "stage"}}``;
- never a 5xx, never a hang (a whole answer within ``timeout_s``);
- no trace or source path in any error body (an answer's sources may quote any text).

``label_problems`` checks that no label value in ``/metrics`` was taken from a request.
``tests/test_http_fuzz.py`` runs a seed-fixed sample; ``benchmarks/bench_fuzz.py`` 10,000.
``request`` (one request of a category, from a given ``Random``) and ``raw_request`` (a body
and headers of the caller's own) are what ``tests/test_http_hypothesis.py`` draws with
hypothesis, judged by the same ``problem``.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

ENDPOINTS = ("/v1/query", "/v1/retrieve", "/v1/chat/completions")
MODEL = "ragserve"
"""The alias every server accepts as the chat model's name."""
LEAKS = re.compile(rb'Traceback|File "|site-packages|\.py[":, ]|/ragserve/|/usr/lib/|/home/|/work/')
"""What a body must never show: a trace or a path on the server."""
_CATEGORIES = (("valid", 10), ("wrong_type", 22), ("fields", 8), ("strings", 22), ("malformed", 15),
               ("headers", 15), ("method_path", 4), ("framing", 4))
CATEGORIES = tuple(name for name, _ in _CATEGORIES)
"""What ``requests`` draws from, with these weights (``request`` makes one of a given category)."""


@dataclass
class FuzzRequest:
    endpoint: str
    category: str
    detail: str
    raw: bytes


@dataclass
class Answer:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0
    error: str = ""  # "hang" (no whole answer in time), or how the connection failed


# -- values ------------------------------------------------------------------------------------


def hostile_string(rnd: random.Random) -> tuple[str, str]:
    """(a name for it, a string a client should not send but may)."""
    kind = rnd.choice(("empty", "blank", "huge", "over_body", "unicode", "astral", "surrogate", "control",
                       "nul", "rtl", "newlines", "html", "format", "path", "long_word"))
    n = rnd.choice((1, 10, 300, 5000))
    value = {
        "empty": "",
        "blank": " \t\n" * n,
        "huge": "why " * rnd.randint(2000, 15000),
        "over_body": "x" * rnd.randint(70_000, 200_000),
        "unicode": "".join(chr(rnd.randint(0x80, 0xFFFF)) for _ in range(n)).replace("\ud800", "?"),
        "astral": "".join(chr(rnd.randint(0x10000, 0x10FFFF)) for _ in range(min(n, 2000))),
        "surrogate": "what is " + chr(rnd.randint(0xD800, 0xDFFF)) * rnd.randint(1, 5) + " this?",
        "control": "".join(chr(rnd.randint(0, 31)) for _ in range(n)),
        "nul": "what\x00is\x00this?",
        "rtl": "\u202ewhat is this\u200b\u200d\ufeff?",
        "newlines": "line\r\nX-Injected: 1\r\n\r\nGET / HTTP/1.1\r\n",
        "html": "<script>alert(1)</script>" * min(n, 100),
        "format": "%s%n{0}{__class__}${x}" * min(n, 50),
        "path": "../../../../etc/passwd",
        "long_word": "a" * rnd.choice((1000, 30_000)),
    }[kind]
    return kind, value


def hostile_value(rnd: random.Random) -> tuple[str, Any]:
    kind = rnd.choice(("null", "true", "zero", "negative", "float", "huge_int", "big_float", "string",
                       "empty_list", "empty_object", "list", "object", "deep"))
    if kind == "string":
        return hostile_string(rnd)
    value = {"null": None, "true": True, "zero": 0, "negative": -rnd.randint(1, 10**6), "float": rnd.random() * 7,
             "huge_int": 10 ** rnd.randint(19, 400), "big_float": 1e308, "empty_list": [], "empty_object": {},
             "list": ["what", 1, None], "object": {"question": "nested"}, "deep": _deep(rnd.randint(30, 3000))}[kind]
    return kind, value


def _deep(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def valid_body(endpoint: str, rnd: random.Random) -> dict[str, Any]:
    question = rnd.choice(("What does the with statement do?", "How do I open a file?", "chunk number 3",
                           "Which exceptions exist?"))
    if endpoint == "/v1/retrieve":
        return {"question": question, "top_k": rnd.randint(1, 10)}
    if endpoint == "/v1/query":
        body: dict[str, Any] = {"question": question, "stream": rnd.random() < 0.3}
        if rnd.random() < 0.3:
            body["cache"] = {"read": rnd.random() < 0.5, "write": rnd.random() < 0.5}
        if rnd.random() < 0.3:
            body["top_k"] = rnd.randint(1, 5)
        return body
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "stream": rnd.random() < 0.3}


def _fields(endpoint: str) -> tuple[str, ...]:
    return {"/v1/query": ("question", "namespace", "top_k", "cache", "timeout_s", "stream"),
            "/v1/retrieve": ("question", "top_k"),
            "/v1/chat/completions": ("model", "messages", "stream", "stream_options", "max_tokens", "temperature",
                                     "top_p", "n", "messages.0.content", "messages.0.role", "messages.0")}[endpoint]


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    target: Any = body
    for p in parts[:-1]:
        target = target[int(p)] if isinstance(target, list) else target[p]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


def _dumps(value: Any) -> bytes:
    """JSON text; lone surrogates as ``\\udxxx`` escapes (valid JSON, invalid Unicode)."""
    try:
        return json.dumps(value, ensure_ascii=True, allow_nan=True).encode("ascii")
    except RecursionError:
        return b"[" * 5000 + b"]" * 5000


# -- requests --------------------------------------------------------------------------------------


def requests(seed: int, n: int, key: str | None = None) -> Iterator[FuzzRequest]:
    """``n`` requests drawn from ``random.Random(seed)``, with ``Authorization: Bearer
    key`` on most of them when ``key`` is given."""
    rnd = random.Random(seed)
    names, weights = zip(*_CATEGORIES, strict=True)
    for _ in range(n):
        endpoint = rnd.choice(ENDPOINTS)
        category = rnd.choices(names, weights)[0]
        yield _one(rnd, endpoint, category, key)


def request(rnd: random.Random, endpoint: str, category: str, key: str | None = None) -> FuzzRequest:
    """One request of ``category`` (a name of ``CATEGORIES``) for ``endpoint``, its choices
    drawn from ``rnd`` (hypothesis's ``st.randoms()`` draws them so that it can shrink)."""
    if category not in CATEGORIES:
        raise ValueError(f"no fuzz category {category!r}; one of {', '.join(CATEGORIES)}")
    return _one(rnd, endpoint, category, key)


def raw_request(endpoint: str, body: bytes, headers: list[tuple[str, Any]], *, key: str | None = None,
                method: str = "POST", detail: str = "drawn") -> FuzzRequest:
    """A request with a body and headers of the caller's own (values ``str`` or raw
    ``bytes``), framed as every request here is: Host, Content-Type JSON unless given,
    ``Authorization: Bearer key`` when ``key`` is given, Content-Length, Connection: close."""
    names = {name.lower() for name, _ in headers}
    base = [("Host", "127.0.0.1")]
    if "content-type" not in names:
        base.append(("Content-Type", "application/json"))
    auth = [("Authorization", f"Bearer {key}")] if key else []
    return FuzzRequest(endpoint, "drawn", detail, _encode(method, endpoint, base + auth + headers, body, ""))


def _one(rnd: random.Random, endpoint: str, category: str, key: str | None) -> FuzzRequest:
    body = valid_body(endpoint, rnd)
    method, path, detail = "POST", endpoint, ""
    headers = [("Host", "127.0.0.1"), ("Content-Type", "application/json")]
    if key and rnd.random() < 0.95:
        headers.append(("Authorization", f"Bearer {key}"))
    data: bytes | None = None
    framing = ""
    if category == "wrong_type":
        name = rnd.choice(_fields(endpoint))
        detail, value = hostile_value(rnd)
        _set(body, name, value)
        detail = f"{name}={detail}"
    elif category == "fields":
        detail = rnd.choice(("missing", "unknown", "empty_object", "duplicate"))
        if detail == "missing":
            body.pop(rnd.choice(sorted(body)), None)
        elif detail == "unknown":
            body[rnd.choice(("__proto__", "constructor", "Question", "x" * 300))] = 1
        elif detail == "empty_object":
            body = {}
        else:
            first = next(iter(body))
            data = _dumps(body)[:-1] + b', "' + first.encode() + b'": 7}'
    elif category == "strings":
        name = {"/v1/query": rnd.choice(("question", "namespace")), "/v1/retrieve": "question",
                "/v1/chat/completions": rnd.choice(("messages.0.content", "model"))}[endpoint]
        detail, value = hostile_string(rnd)
        _set(body, name, value)
        detail = f"{name}={detail}"
    elif category == "malformed":
        detail = rnd.choice(("truncated", "trailing", "single_quotes", "nan", "not_utf8", "empty", "bom",
                             "top_array", "top_string", "top_number", "nul_bytes", "unclosed_string"))
        text = _dumps(body)
        data = {"truncated": text[: rnd.randint(0, max(0, len(text) - 1))], "trailing": text + b" }garbage",
                "single_quotes": text.replace(b'"', b"'"), "nan": text[:-1] + b', "top_k": NaN}',
                "not_utf8": text[:-2] + b'\xff\xfe\xc3("}', "empty": b"", "bom": b"\xef\xbb\xbf" + text,
                "top_array": b"[" + text + b"]", "top_string": b'"question"', "top_number": b"42",
                "nul_bytes": text.replace(b" ", b"\x00"), "unclosed_string": b'{"question": "never ends'}[detail]
    elif category == "headers":
        detail = rnd.choice(("no_content_type", "text_plain", "form", "charset", "bad_key", "no_key", "long_key",
                             "request_id_long", "request_id_ctl", "request_id_ok", "many_headers", "big_header",
                             "ctl_in_value", "high_bytes", "space_in_name", "obs_fold", "no_host",
                             "expect_continue", "dup_content_type"))
        headers = _bad_headers(rnd, detail, headers, key)
    elif category == "method_path":
        detail = rnd.choice(("get", "put", "delete", "trailing_slash", "query_string", "percent", "double_slash",
                             "lower_method"))
        method = {"get": "GET", "put": "PUT", "delete": "DELETE", "lower_method": "post"}.get(detail, "POST")
        path = {"trailing_slash": endpoint + "/", "query_string": endpoint + "?x=%00&y=" + "z" * 500,
                "percent": endpoint.replace("/v1/", "/v1/%2e%2e/v1/"), "double_slash": "/" + endpoint}.get(detail, path)
    elif category == "framing":
        detail = framing = rnd.choice(("length_short", "length_long", "chunked", "bad_chunked", "length_and_chunked",
                                       "negative_length", "two_lengths"))
    if data is None:
        data = _dumps(body)
    return FuzzRequest(endpoint, category, detail or "valid", _encode(method, path, headers, data, framing))


def _bad_headers(rnd: random.Random, detail: str, headers: list[tuple[str, str]],
                 key: str | None) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [h for h in headers if not (detail == "no_key" and h[0] == "Authorization")]
    if detail in ("bad_key", "long_key"):
        out = [h for h in out if h[0] != "Authorization"]
        out.append(("Authorization", "Bearer " + ("k" * 20_000 if detail == "long_key" else "wrong-key-0123456789")))
    if detail == "no_content_type":
        out = [h for h in out if h[0] != "Content-Type"]
    replace = {"text_plain": "text/plain", "form": "application/x-www-form-urlencoded",
               "charset": "application/json; charset=utf-7"}
    if detail in replace:
        out = [(n, replace[detail] if n == "Content-Type" else v) for n, v in out]
    extra: dict[str, list[tuple[str, Any]]] = {
        "request_id_long": [("X-Request-Id", "r" * 5000)],
        "request_id_ctl": [("X-Request-Id", b"abc\x01\x7fdef")],
        "request_id_ok": [("X-Request-Id", f"fuzz-{rnd.randint(0, 10**9)}")],
        "many_headers": [(f"X-F{i}", "v") for i in range(rnd.choice((50, 150, 1000)))],
        "big_header": [("X-Big", "b" * rnd.choice((1000, 40_000)))],
        "ctl_in_value": [("X-Ctl", b"a\x00b\x07c")],
        "high_bytes": [("X-High", bytes(range(0x80, 0x100)))],
        "space_in_name": [("X Bad", "v")],
        "obs_fold": [("X-Fold", "first\r\n  continued")],
        "expect_continue": [("Expect", "100-continue")],
        "dup_content_type": [("Content-Type", "text/html")],
    }
    out.extend(extra.get(detail, []))
    if detail == "no_host":
        out = [h for h in out if h[0] != "Host"]
    return out


def _encode(method: str, path: str, headers: list[tuple[str, Any]], data: bytes, framing: str) -> bytes:
    head = [f"{method} {path} HTTP/1.1".encode()]
    for name, value in headers:
        head.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode("utf-8")))
    head.append(b"Connection: close")
    if framing in ("chunked", "bad_chunked", "length_and_chunked"):
        head.append(b"Transfer-Encoding: chunked")
        if framing == "length_and_chunked":
            head.append(b"Content-Length: %d" % len(data))
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if framing != "bad_chunked" else b"zz\r\n" + data
    else:
        length = {"length_short": max(0, len(data) - 5), "length_long": len(data) + 100,
                  "negative_length": -1}.get(framing, len(data))
        head.append(b"Content-Length: %d" % length)
        if framing == "two_lengths":
            head.append(b"Content-Length: %d" % (len(data) + 1))
        body = data
    return b"\r\n".join(head) + b"\r\n\r\n" + body


# -- sending and judging -------------------------------------------------------------------------------


async def send(port: int, raw: bytes, timeout_s: float) -> Answer:
    """Send ``raw`` on a new connection and read until the server closes it."""
    t = time.perf_counter()
    answer = Answer()
    data = b""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                try:
                    writer.write(raw)
                    await writer.drain()
                except (ConnectionError, OSError):
                    pass  # refused half-way (a 431, a 413): the answer is still there to read
                try:
                    while chunk := await reader.read(65536):
                        data += chunk
                except (ConnectionError, OSError) as e:
                    answer.error = "" if data else f"{type(e).__name__} before any answer"
            finally:
                writer.close()
    except TimeoutError:
        answer.error = "hang"
    except (ConnectionError, OSError) as e:
        answer.error = f"{type(e).__name__}: {e}"
    answer.seconds = time.perf_counter() - t
    _parse(data, answer)
    return answer


def _parse(data: bytes, answer: Answer) -> None:
    while data.startswith(b"HTTP/1.1 1"):  # an interim 100 Continue
        data = data.partition(b"\r\n\r\n")[2]
    head, sep, body = data.partition(b"\r\n\r\n")
    if not data.startswith(b"HTTP/1.1 ") or not sep:
        if not answer.error:
            answer.error = "no answer" if not data else f"not an HTTP answer: {data[:80]!r}"
        return
    lines = head.split(b"\r\n")
    answer.status = int(lines[0].split(b" ", 2)[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        answer.headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if answer.headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body, answer)
    answer.body = body


def _dechunk(body: bytes, answer: Answer) -> bytes:
    out = b""
    while True:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            answer.error = answer.error or "a chunked body cut short"
            return out
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            return out
        out, body = out + rest[:size], rest[size + 2:]


OPENAI_FIELDS = {"param", "code"}
"""What an error body may add on the OpenAI routes, as OpenAI's does (an unknown model's 404)."""


def error_body_ok(error: dict[str, Any]) -> bool:
    """``{type, message, stage}``, and on the OpenAI routes maybe OpenAI's ``param`` and ``code``."""
    keys = set(error)
    return {"type", "message", "stage"} <= keys <= {"type", "message", "stage", *OPENAI_FIELDS}


def problem(req: FuzzRequest, answer: Answer) -> str | None:
    """None if the answer is one a server may give to ``req``; else what is wrong."""
    if answer.error and answer.status is None:
        return answer.error
    status = answer.status or 0
    if status >= 400 and LEAKS.search(answer.body):  # (an answer's sources may quote any text)
        return f"{status}: the error body shows a trace or a path: {answer.body[:200]!r}"
    if status >= 500:
        return f"{status}: {answer.body[:200]!r}"
    if 400 <= status < 500:
        try:
            error = orjson.loads(answer.body)["error"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return f"{status} without the typed error body: {answer.body[:200]!r}"
        if not isinstance(error, dict) or not error_body_ok(error):
            return f"{status}: the error body is not {{type, message, stage}}: {answer.body[:200]!r}"
        return None
    if not 200 <= status < 300:
        return f"unexpected status {status}"
    if answer.error:
        return f"{status}: {answer.error}"
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        if b"event: error" in answer.body:
            return f"{status}: an error event in the stream: {answer.body[-300:]!r}"
        end = b"data: [DONE]\n\n" if req.endpoint == "/v1/chat/completions" else b"event: done"
        return None if end in answer.body else f"{status}: the stream has no end: {answer.body[-200:]!r}"
    try:
        orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return f"{status}: the body is not JSON: {answer.body[:200]!r}"
    return None


async def run(port: int, reqs: list[FuzzRequest], *, concurrency: int = 8,
              timeout_s: float = 30.0) -> list[tuple[FuzzRequest, Answer, str | None]]:
    """Every request on its own connection, ``concurrency`` at a time; in order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(req: FuzzRequest) -> tuple[FuzzRequest, Answer, str | None]:
        async with gate:
            answer = await send(port, req.raw, timeout_s)
        return req, answer, problem(req, answer)

    return list(await asyncio.gather(*(one(r) for r in reqs)))


# -- /metrics ------------------------------------------------------------------------------------------


def label_problems(metrics_text: str, known: set[str]) -> list[str]:
    """Label values of ``/metrics`` outside ``known`` (and the histograms' ``le``): each
    would be a series a client could create."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            for name, value in sample.labels.items():
                if name != "le" and value not in known:
                    out.append(f"{sample.name}{{{name}={value[:80]!r}}}")
    return out


def known_labels() -> set[str]:
    """Every label value ragserve's own code can put in ``/metrics``."""
    from dataclasses import fields

    import ragserve.errors as errors
    from ragserve.server.limits import REASONS
    from ragserve.types import Timings

    names = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, BaseException)}
    return (names | set(REASONS) | {f.name for f in fields(Timings)} | {"InternalError"}
            | {"ok", "error", "timeout", "cancelled", "overloaded", "invalid", "l1", "l2", "miss",
               "closed", "open", "half-open"})


__all__ = ["CATEGORIES", "ENDPOINTS", "Answer", "FuzzRequest", "known_labels", "label_problems", "problem",
           "raw_request", "request", "requests", "run", "send"]
