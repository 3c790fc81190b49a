"""What the connection limits refuse is counted in /metrics (``ragserve_http_refusals_total``
by a fixed ``reason``), from real bytes over loopback sockets; and a client that never reads
its stream is cut off by ``send_timeout_s`` even when the answer fits in the kernel's
buffers (``ragserve/server/limits.py``)."""

import contextlib
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ragserve.config import RAGConfig
from ragserve.server.app import create_app
from ragserve.server.limits import REASONS
from ragserve.testing.fakes import FakeGenerator
from ragserve.testing.fakes import fake_rag as make_rag
from ragserve.testing.http import connect, get, running
from ragserve.testing.waits import WAIT_S, eventually

pytestmark = pytest.mark.http
TCP_ESTABLISHED = 1


@contextlib.contextmanager
def serve(tmp_path, generator, **limits):
    config = RAGConfig().replace(server=limits)
    rag = make_rag(tmp_path, generator)
    with rag, running(create_app(rag, config), limits=config.server) as url:
        yield url, int(url.rsplit(":", 1)[1])



def until_closed(s):
    """Everything the server sends until it closes the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        while chunk := s.recv(65536):
            data += chunk
    s.close()
    return data


def refusals(url):
    """{reason: count} from the server's /metrics."""
    text = get(f"{url}/metrics").text
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "ragserve_http_refusals" for s in f.samples if s.name.endswith("_total")}


def stream_request(question):
    body = b'{"question": "%s", "stream": true}' % question.encode()
    return (b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def test_every_refusal_is_counted_by_its_reason(tmp_path):
    gen = FakeGenerator(words=2, delay=0.01)
    limits = dict(max_connections=3, ops_connections=0, header_timeout_s=1.0, body_timeout_s=1.0)
    with serve(tmp_path, gen, **limits) as (url, port):
        assert refusals(url) == dict.fromkeys(REASONS, 0)  # every reason, from the start

        s = connect(port)  # 300 header fields (the limit is 100)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(300))
                  + b"\r\n")
        assert until_closed(s).startswith(b"HTTP/1.1 431 ")

        s = connect(port)  # not HTTP at all: a typed 400, not uvicorn's plain text
        s.sendall(b"\x00\x01 NOT HTTP\r\n\r\n")
        data = until_closed(s)
        assert data.startswith(b"HTTP/1.1 400 ") and b'"type":"InvalidHTTP"' in data

        slow_head, slow_body, silent = connect(port), connect(port), connect(port)
        slow_head.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow_body.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{")
        assert until_closed(slow_head).startswith(b"HTTP/1.1 408 ")
        assert until_closed(slow_body).startswith(b"HTTP/1.1 408 ")
        assert until_closed(silent) == b""  # nothing asked, nothing answered

        gen.hold = True  # three streams hold every connection (ops_connections = 0)
        held = [connect(port) for _ in range(3)]
        try:
            for i, s in enumerate(held):
                s.sendall(stream_request(f"held {i}"))
                assert s.makefile("rb").readline().startswith(b"HTTP/1.1 200")
            s = connect(port)
            data = until_closed(s)
            assert data.startswith(b"HTTP/1.1 503 ") and b"TooManyConnections" in data
        finally:
            gen.hold = False
            for s in held:
                s.close()

        expected = {**dict.fromkeys(REASONS, 0), "headers_too_large": 1, "invalid_request": 1,
                    "header_timeout": 1, "body_timeout": 1, "idle_closed": 1, "refused_full": 1}
        assert eventually(lambda: refusals(url) == expected, WAIT_S, 0.1, "the refusals in /metrics")
        text = get(f"{url}/metrics").text
        assert "ragserve_http_connections_open " in text and "ragserve_http_connections_busy " in text


def tcp_state(s):
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def test_a_stream_nobody_reads_is_cut_off_while_it_is_generated(tmp_path):
    """The bench's case: a long answer, a piece every millisecond, a client with a 4 KiB
    receive buffer that never reads. Each piece fits in the kernel's send buffer, so
    asyncio's never fills; on main the stream ran to its end (200 s here), never cut off."""
    gen = FakeGenerator(words=200_000, delay=200.0)
    with serve(tmp_path, gen, send_timeout_s=1.0) as (url, port):
        s = connect(port, rcvbuf=4096)
        s.sendall(stream_request("a long answer"))  # and never read
        eventually(lambda: gen.running == 1, WAIT_S, 0.02, "the generation to start")
        t = time.monotonic()
        eventually(lambda: gen.running == 0, WAIT_S, 0.05, "the stream of a client that never reads to be cut off")
        assert time.monotonic() - t < 100  # far from the answer's own 200 s
        assert tcp_state(s) != TCP_ESTABLISHED  # reset by the server
        assert refusals(url)["send_timeout"] == 1
        s.close()


def test_a_small_answer_nobody_reads_is_cut_off_after_it_is_written(tmp_path):
    """~150 KB of events, all in the kernel's buffers at once: the response is complete, the
    client has taken 4 KiB of it. On main keep-alive closed the socket after 5 s and left
    the data to the kernel, the client's connection still open; now it is reset."""
    gen = FakeGenerator(words=4_000, delay=0.05)
    with serve(tmp_path, gen, send_timeout_s=1.0) as (url, port):
        s = connect(port, rcvbuf=4096)
        s.sendall(stream_request("a short answer"))  # and never read
        eventually(lambda: len(gen.prompts) == 1 and gen.running == 0, WAIT_S, 0.02, "the answer to be written")
        eventually(lambda: tcp_state(s) != TCP_ESTABLISHED, WAIT_S, 0.05, "the server to reset the connection")
        assert refusals(url)["send_timeout"] == 1
        s.close()


def test_a_client_that_reads_slowly_is_not_cut_off(tmp_path):
    """2 KiB every 0.2 s (about 2 s for the answer) against a 1 s send timeout: progress,
    however slow, keeps the connection."""
    gen = FakeGenerator(words=500, delay=0.05)
    with serve(tmp_path, gen, send_timeout_s=1.0) as (url, port):
        s = connect(port, rcvbuf=4096)
        s.sendall(stream_request("read slowly"))
        data = b""
        deadline = time.monotonic() + WAIT_S
        while not data.endswith(b"\r\n0\r\n\r\n") and time.monotonic() < deadline:
            chunk = s.recv(2048)
            if not chunk:
                break
            data += chunk
            time.sleep(0.2)
        assert b"event: done" in data and data.endswith(b"\r\n0\r\n\r\n")  # the whole stream, its end
        assert refusals(url)["send_timeout"] == 0
        s.close()
