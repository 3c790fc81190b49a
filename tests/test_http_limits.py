"""Hostile HTTP traffic against a real server on loopback (``ragserve/server/limits.py``):
the same bytes as issue 28's reports, over raw sockets, bounded in count and time.
Full-size figures (20,000 idle connections, 200 tricklers): ``benchmarks/bench_hostile.py``."""

import asyncio
import contextlib
import select
import socket
import threading
import time

import httpx
import pytest
from starlette.responses import StreamingResponse

from ragserve.config import RAGConfig, ServerConfig
from ragserve.errors import ConfigError
from ragserve.server.app import create_app
from ragserve.server.auth import ApiKeys
from ragserve.testing.fakes import FakeGenerator
from ragserve.testing.fakes import fake_rag as make_rag
from ragserve.testing.http import connect, get, post, running
from ragserve.testing.waits import HTTP_TIMEOUT_S, WAIT_S, eventually

pytestmark = pytest.mark.http
KEY = "tenant-a-key-0123456789"


@contextlib.contextmanager
def serve(tmp_path, generator=None, keys=None, **limits):
    """(base url, port, rag) of the app over fakes, served with ``limits`` in ``[server]``."""
    config = RAGConfig().replace(server=limits)
    rag = make_rag(tmp_path, generator or FakeGenerator(words=2, delay=0.01))
    with rag, running(create_app(rag, config, keys=keys), limits=config.server) as url:
        yield url, int(url.rsplit(":", 1)[1]), rag



def answer(s, timeout_s=HTTP_TIMEOUT_S):
    """(status or None, raw bytes, closed): what the server sends until it closes the
    connection (``closed``) or ``timeout_s`` passes."""
    s.settimeout(timeout_s)
    data, closed = b"", False
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            closed = True
            break
        except TimeoutError:
            break
        if not chunk:
            closed = True
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, data, closed


def send_quietly(s, data):
    """``sendall``, but a connection the server already ended is not the test's error."""
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        s.sendall(data)


def test_too_many_headers_get_431_and_the_connection_is_closed(tmp_path):
    with serve(tmp_path) as (url, port, _):
        s = connect(port)
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(300))  # the limit is 100
        send_quietly(s, b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        status, data, closed = answer(s)
        assert status == 431 and b"server.max_headers" in data and closed
        assert get(f"{url}/health").status_code == 200  # the server itself is fine


def test_a_1_mb_header_value_gets_431_and_the_connection_is_closed(tmp_path):
    with serve(tmp_path) as (_url, port, _):
        s = connect(port)
        send_quietly(s, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        status, data, closed = answer(s)
        assert status == 431 and b"server.max_header_bytes" in data and closed


def test_a_header_section_that_never_ends_is_cut_off(tmp_path):
    """Header lines, 64 KiB at a time, up to 4 MB, never ended: answered 431 and cut off
    (on main the server buffered all of it and never answered)."""
    with serve(tmp_path) as (_url, port, _):
        s = connect(port)
        send_quietly(s, b"GET /health HTTP/1.1\r\nHost: x\r\n")
        line = b"X-Filler: " + b"b" * 90 + b"\r\n"
        chunk = line * (65536 // len(line))
        got, sent = b"", 0
        deadline = time.monotonic() + WAIT_S
        while sent < 4 << 20 and time.monotonic() < deadline and not got:
            try:
                s.sendall(chunk)
            except (ConnectionResetError, BrokenPipeError):
                break
            sent += len(chunk)
            if select.select([s], [], [], 0)[0]:
                got = s.recv(65536)
        _, data, closed = answer(s)
        data = got + data
        assert data.startswith(b"HTTP/1.1 431 ") and closed


def trickle(socks, deadline_s):
    """Send one byte a second to each socket until the server closes it; the answers."""
    answers = {s: b"" for s in socks}
    open_ = set(socks)
    end = time.monotonic() + deadline_s
    while open_ and time.monotonic() < end:
        for s in list(open_):
            try:
                s.send(b"a")
            except OSError:
                pass  # closed by the server: seen on read below
        ready = select.select(list(open_), [], [], 1.0)[0]
        for s in ready:
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            answers[s] += chunk
            if not chunk:
                open_.discard(s)
    return answers, open_


def test_trickled_headers_and_bodies_time_out(tmp_path):
    """1 byte/s: three connections trickling headers, three a body; with 2 s timeouts each
    gets 408 and is closed (on main all stayed open)."""
    with serve(tmp_path, header_timeout_s=2.0, body_timeout_s=2.0) as (url, port, _):
        heads = [connect(port) for _ in range(3)]
        for s in heads:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        bodies = [connect(port) for _ in range(3)]
        for s in bodies:
            s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{")
        answers, still_open = trickle(heads + bodies, WAIT_S)
        assert not still_open
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers.values()), answers
        assert b"server.header_timeout_s" in answers[heads[0]] and b"server.body_timeout_s" in answers[bodies[0]]
        assert get(f"{url}/health").status_code == 200


def test_idle_connections_past_the_cap_make_room_for_new_clients(tmp_path):
    """Cap 50: 80 idle connections (half with a partial request line, half silent). The
    oldest are closed to make room, new clients are served, /health answers."""
    with serve(tmp_path, max_connections=50, ops_connections=5, header_timeout_s=600) as (url, port, _):
        idle = []
        for i in range(80):
            s = connect(port)
            if i % 2:
                s.sendall(b"GET /hea")
            idle.append(s)
        for _ in range(3):  # new clients, each on a new connection
            assert get(f"{url}/health").status_code == 200
            assert post(f"{url}/v1/retrieve", json={"question": "which chunk?"}).status_code == 200

        def closed_by_server():
            readable = select.select(idle, [], [], 0)[0]
            return sum(1 for s in readable if not _peek(s))

        assert eventually(lambda: closed_by_server() >= 30, WAIT_S, 0.05, "the server to close the oldest idle")
        for s in idle:
            s.close()


def _peek(s):
    try:
        return s.recv(1, socket.MSG_PEEK)
    except OSError:
        return b""


def test_when_every_connection_is_busy_probes_still_answer(tmp_path):
    """Cap 12, 4 kept for probes: 8 streams held open (busy), then a query gets 503 at
    once while /health answers."""
    gen = FakeGenerator(words=2, delay=0.01)
    gen.hold = True
    with serve(tmp_path, gen, max_connections=12, ops_connections=4) as (url, port, _):
        streams = []
        try:
            for i in range(8):
                s = connect(port)
                body = b'{"question": "held %d", "stream": true}' % i
                s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                assert s.makefile("rb").readline().startswith(b"HTTP/1.1 200")  # the stream began; tokens held
                streams.append(s)
            refused = post(f"{url}/v1/retrieve", json={"question": "which chunk?"})
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "Busy"
            assert refused.headers["connection"] == "close"
            assert get(f"{url}/health").status_code == 200
            assert get(f"{url}/metrics").status_code == 200
        finally:
            gen.hold = False
            for s in streams:
                s.close()
        eventually(lambda: post(f"{url}/v1/retrieve", json={"question": "again"}).status_code == 200, WAIT_S,
                   0.1, "queries to be served once the streams end")


def test_a_client_that_does_not_read_is_disconnected(tmp_path):
    """A response the client never reads: after send_timeout_s with the write buffer
    full, the connection is aborted and the app's stream ends (on main it waited forever)."""
    ended = threading.Event()
    produced = [0]

    async def endless():
        try:
            while produced[0] < 256 << 20:  # bounded even if nothing stops it
                produced[0] += 65536
                yield b"x" * 65536
                await asyncio.sleep(0)  # as a token stream waits for its next piece
        finally:
            ended.set()

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await StreamingResponse(endless(), media_type="application/octet-stream")(scope, receive, send)

    limits = ServerConfig(send_timeout_s=1.0)
    with running(app, limits=limits) as url:
        s = connect(int(url.rsplit(":", 1)[1]), rcvbuf=4096)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        assert ended.wait(WAIT_S), "the stream to a client that does not read never ended"
        assert produced[0] < 64 << 20  # buffers stayed bounded: nothing near the 256 MB cap
        s.close()


def test_a_trailing_slash_is_404_not_a_redirect_to_the_host_header(tmp_path):
    with serve(tmp_path) as (url, _port, _):
        r = httpx.post(f"{url}/v1/query/", json={"question": "q"}, headers={"Host": "evil.example"},
                       timeout=HTTP_TIMEOUT_S, follow_redirects=False)
        assert r.status_code == 404 and "location" not in r.headers


def test_without_a_key_an_invalid_body_gets_401_not_the_schema(tmp_path):
    keys = ApiKeys({KEY: "a"})
    with serve(tmp_path, keys=keys) as (url, _port, _):
        for body in ({"question": 5, "top_k": "x"}, {}):
            r = post(f"{url}/v1/query", json=body)
            assert r.status_code == 401 and "question" not in r.text and r.headers["x-request-id"]
        r = post(f"{url}/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 401
        r = post(f"{url}/v1/query", json={"question": 5}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 422  # with a key, the schema's message


def test_the_admin_key_needs_16_characters_and_can_come_from_a_file(tmp_path):
    with pytest.raises(ConfigError, match="server.admin_key: must have 16"):
        RAGConfig().replace(server={"admin_key": "short"})
    key = tmp_path / "admin.key"
    key.write_text("admin-key-from-a-file-0123\n")
    cfg = RAGConfig().replace(server={"admin_key_file": str(key)})
    with serve(tmp_path / "idx", admin_key_file=str(key)) as (url, _port, _):
        assert post(f"{url}/admin/reset_prefix_cache").status_code == 401
        ok = post(f"{url}/admin/reset_prefix_cache", headers={"Authorization": "Bearer admin-key-from-a-file-0123"})
        assert ok.status_code == 200
    key.write_text("short")
    with pytest.raises(ConfigError, match="admin_key_file"):
        create_app(None, cfg)


@pytest.mark.parametrize(("field", "value"), [("max_header_bytes", 100), ("max_headers", 0),
                                              ("header_timeout_s", 0), ("send_timeout_s", -1),
                                              ("max_connections", 1), ("ops_connections", 4096)])
def test_limits_are_validated(field, value):
    with pytest.raises(ConfigError, match=f"server.{field}: must"):
        RAGConfig().replace(server={field: value})
