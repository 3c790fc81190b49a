"""What one HTTP client, and all of them together, may hold of the server.

uvicorn's default parser (httptools) has no limit on a request's headers (100,000 headers
or one 16 MB value were answered 200; a header section that never ended was buffered
whole), and no connection ever timed out before its first request (idle and 1-byte/s
connections stayed open until the descriptors ran out). ``LimitedProtocol`` is uvicorn's
httptools protocol with these bounds, all in ``[server]``:

| bound | knob | default | past it |
|---|---|---|---|
| request line + headers, bytes | ``max_header_bytes`` | 32 KiB | 431, connection closed |
| header fields | ``max_headers`` | 100 | 431, connection closed |
| connect (or a keep-alive request's first byte) to the end of the headers | ``header_timeout_s`` | 10 s | 408 and closed (closed silently if nothing came) |
| end of headers to the end of the body | ``body_timeout_s`` | 30 s | 408 and closed |
| idle keep-alive between requests | ``keepalive_timeout_s`` | 5 s | closed |
| open connections | ``max_connections`` | 4096 | the oldest connection without a request in progress is closed to make room; if every one is busy, 503 at once |
| of those, kept for ``/health``, ``/ready``, ``/metrics`` | ``ops_connections`` | 16 | other requests get 503 when only these are left |
| a response the client does not read | ``send_timeout_s`` | 30 s | aborted once the client has taken no byte of it for that long |

A client that does not read is seen by what it acknowledges, not by the server's own
buffer: an answer of a few hundred KB fits whole in the kernel's send buffer (loopback
grows it to ``net.ipv4.tcp_wmem``'s 4 MB), so asyncio's buffer never fills and the stream
would end (or sit there after its last event) without a refusal. While a response is under
way, or the kernel still holds part of it, the connection's TCP_INFO (``tcpi_bytes_acked``)
is read every ``send_timeout_s / 4`` (1 s at most); no byte acknowledged for
``send_timeout_s`` while some wait, and the connection is aborted (a reset frees the kernel's
buffer at once). A client reading slowly keeps it. Where TCP_INFO is not available (not
Linux, a unix socket), asyncio's buffer staying full that long is the sign, as before.

Every refusal is counted by a reason from ``REASONS`` (``ConnectionGuard.counts``), exported
in ``/metrics`` as ``ragserve_http_refusals_total{reason}``.

Why httptools with a subclass rather than h11: h11 refuses a header section over its
``max_incomplete_event_size`` (400, not 431), but has no timeouts either, parses in Python
(slower per request; ``benchmarks/bench_hostile.py`` measures both), and nothing else here
needs it. Every limit here is wall-clock, so a client cannot stretch it one byte at a time.

A refusal is answered, then the connection lingers for at most ``LINGER_S`` reading and
discarding what the client still sends (nginx's lingering close): closing a socket with
unread data sends a reset, which can destroy the 431 before the client reads it.

**Usage:** ``uvicorn.Config(app, **uvicorn_options(config.server))`` (``run.py`` and
``ragserve.testing.http.running`` do this).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import time
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ragserve.config import ServerConfig
from ragserve.server.connections import REASONS, ConnectionGuard, fit_descriptors
from ragserve.server.httperrors import HTTPError, body, response
from ragserve.server.middleware import OPS_PATHS

LINGER_S = 2.0
"""How long a refused connection is read and discarded before it is closed."""
_OPS = frozenset(p.encode() for p in OPS_PATHS)
_TCPI_BYTES_ACKED = 120
"""Offset of ``tcpi_bytes_acked`` (u64) in Linux's ``struct tcp_info`` (since 4.1)."""


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request that is over a limit."""


def _raw(status: int, reason: str, type_: str, message: str) -> bytes:
    """A complete HTTP/1.1 response, written straight to the transport (no app runs)."""
    data = orjson.dumps(body(HTTPError(status, type_, message, "http")))
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
            f"connection: close\r\n\r\n")
    return head.encode("ascii") + data


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of the module docstring. One subclass
    per server (``limited_protocol``) carries that server's ``guard``."""

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._in_head = True  # between a request's first byte (or the connection) and its headers' end
        self._head_bytes = 0  # bytes read while in the head: bounds a head that never ends
        self._head_size = 0  # the parsed request line and headers of this request
        self._header_count = 0
        self._begun = False  # a byte of the current request has arrived
        self._refusal: bytes | None = None
        self._done = False  # refused or closed by a limit: whatever comes is discarded
        self._acked = -1  # the client's acknowledged bytes when the send watch last looked
        self._progress_at = 0.0  # when they last grew (or nothing was waiting)
        self._linger_idle = False  # keep-alive's time ran out while the client still had bytes to take
        self._deferred: bytes | None = None  # a refusal to write once the answer under way is complete

    # -- connection ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            self._answer(_raw(503, "Service Unavailable", "TooManyConnections",
                              "the server is at server.max_connections with every connection busy; retry"))
            return
        self._arm(self.guard.s.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._cancel_stall()
        self.guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return  # lingering after a refusal: read and dropped
        if self._in_head:
            self._head_bytes += len(data)
        # NOTE: uvicorn's data_received, but a request refused by a limit, or not HTTP at all,
        # is answered here without uvicorn's warning (one log line per attacker's request).
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._answer(self._refusal)
            else:  # counted, and logged with the refusals at most once a minute: not a line each
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()  # no WebSocket route here (ws="none")
            return
        if self._in_head and self._head_bytes > self.guard.s.max_header_bytes and not self._done:
            self._too_large(f"the request line and headers are over {self.guard.s.max_header_bytes} bytes "
                            "(server.max_header_bytes)")

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse: the typed error body, as every other refusal
        (uvicorn's own is plain text)."""
        self.guard.note("invalid_request")
        self._answer(_raw(400, "Bad Request", "InvalidHTTP", "the request is not valid HTTP/1.1: " + msg))

    def close_now(self) -> None:
        """Close at once: what the client has not taken yet (a client that does not read)
        is dropped."""
        self._done = True
        self.guard.forget(self)
        if self._unsent():
            self._reset()
        else:
            self.transport.close()

    def _reset(self) -> None:
        """Abort with a TCP reset: a plain close would leave what the client has not taken
        to the kernel, which keeps sending it (an orphan socket) for minutes."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def timeout_keep_alive_handler(self) -> None:
        if self.transport.is_closing():
            return
        if self._stall is not None and self._unsent():
            self._linger_idle = True  # still delivering the last answer: the send watch decides
            return
        self.close_now()

    # -- the head: size, count, time -------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_size, self._header_count = True, 0, 0
        self._linger_idle = False
        if not self._begun and self._timer is None:  # a keep-alive request: its own deadline
            self._arm(self.guard.s.header_timeout_s, self._head_timed_out)
        self._begun = True

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self.guard.s.max_header_bytes:
            self._refuse(f"the request line is over {self.guard.s.max_header_bytes} bytes (server.max_header_bytes)")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        s = self.guard.s
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4
        if self._header_count > s.max_headers:
            self._refuse(f"more than {s.max_headers} header fields (server.max_headers)")
        if self._head_size > s.max_header_bytes:
            self._refuse(f"the request line and headers are over {s.max_header_bytes} bytes (server.max_header_bytes)")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel()
        self._in_head, self._head_bytes, self._begun = False, 0, False
        ops = self.url.partition(b"?")[0] in _OPS
        if not self.guard.busy(self) and not ops:
            self.guard.note("refused_busy")
            app, self.app = self.app, _busy  # NOTE: uvicorn reads self.app in this call only
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        self._arm(self.guard.s.body_timeout_s, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._cancel()
        super().on_message_complete()
        self._arm_stall()  # the response begins: watch that the client takes it

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._deferred is not None:
            raw, self._deferred = self._deferred, None
            self._answer(raw)  # a refusal that waited for this answer (see _answer)
            return
        if self.transport.is_closing():
            if self.transport.get_write_buffer_size():  # closing waits for a flush that may never come
                self._arm_stall()
            return
        if not self._unsent():
            self._cancel_stall()  # all taken: nothing to watch until the next request
        if not self.pipeline and (self.cycle is None or self.cycle.response_complete):
            self.guard.rest(self)

    # -- writes the client does not read -----------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_stall()

    def _arm_stall(self) -> None:
        """Start the send watch (see the module docstring), unless it runs already."""
        if self._stall is None:
            self._acked, self._progress_at = -2, time.monotonic()  # -2: the first look counts as progress
            self._stall = self.loop.call_later(self._watch_every(), self._watch_send)

    def _cancel_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _watch_every(self) -> float:
        return min(1.0, self.guard.s.send_timeout_s / 4)

    def _watch_send(self) -> None:
        self._stall = None
        if self.transport.is_closing() and not self.transport.get_write_buffer_size():
            return  # closed, or closing with everything handed to the kernel
        now = time.monotonic()
        unsent, acked = self._unsent(), self._delivered()
        if not unsent or acked != self._acked:
            self._acked, self._progress_at = acked, now
        if not unsent and self.cycle is not None and self.cycle.response_complete and not self.pipeline:
            if self._linger_idle:
                self.close_now()  # its keep-alive time is long over
            return  # delivered: the watch ends until the next response
        if now - self._progress_at >= self.guard.s.send_timeout_s:
            self._send_timed_out()
            return
        self._stall = self.loop.call_later(self._watch_every(), self._watch_send)

    def _send_timed_out(self) -> None:
        self.guard.note("send_timeout")
        self._done = True
        self.guard.forget(self)
        self._reset()  # connection_lost tells the app: its stream ends as if the client left

    def _unsent(self) -> int:
        """Bytes written but not yet acknowledged by the client: asyncio's buffer and the
        kernel's send queue (``SIOCOUTQ``)."""
        pending = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError, ValueError):
                pending += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return pending

    def _delivered(self) -> int:
        """A number that grows whenever the client takes bytes: TCP's acknowledged bytes;
        where TCP_INFO cannot say, -1 while asyncio's buffer is full (no progress) and a new
        value each time it is not."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError, ValueError, struct.error):
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_BYTES_ACKED + 8)
                return struct.unpack_from("<Q", info, _TCPI_BYTES_ACKED)[0]
        return -1 if self.flow.write_paused else time.monotonic_ns()

    # -- timers and refusals ---------------------------------------------------------------
    def _arm(self, delay: float, callback: Any) -> None:
        self._cancel()
        self._timer = self.loop.call_later(delay, callback)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._done or self.transport.is_closing():
            return
        if not self._begun and not self._head_bytes:
            self.guard.note("idle_closed")
            self.close_now()  # nothing was asked: nothing to answer
            return
        self.guard.note("header_timeout")
        self._answer(_raw(408, "Request Timeout", "RequestTimeout", "the request line and headers did not arrive "
                          f"within {self.guard.s.header_timeout_s:g} s (server.header_timeout_s)"))

    def _body_timed_out(self) -> None:
        self._timer = None
        if self._done or self.transport.is_closing():
            return
        self.guard.note("body_timeout")
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.disconnected = True  # the app's receive() now says the client is gone
            cycle.message_event.set()
            self._answer(_raw(408, "Request Timeout", "RequestTimeout", "the request body did not arrive within "
                              f"{self.guard.s.body_timeout_s:g} s of its headers (server.body_timeout_s)"))
        else:
            self.close_now()

    def _refuse(self, message: str) -> None:
        self._refusal = _raw(431, "Request Header Fields Too Large", "HeadersTooLarge", message)
        raise _Refused(message)  # httptools stops parsing; data_received answers

    def _too_large(self, message: str) -> None:
        self._refusal = _raw(431, "Request Header Fields Too Large", "HeadersTooLarge", message)
        self._answer(self._refusal)

    def _answer(self, raw: bytes) -> None:
        """Write a whole response and end the connection: shut down the sending side and
        discard what the client still sends for up to ``LINGER_S``."""
        if self._refusal is not None and raw is self._refusal:
            self.guard.note("headers_too_large")
        self._done = True
        self.guard.forget(self)
        self._cancel()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.disconnected:
            if cycle.more_body:
                # The bytes refused are this request's own body (a chunk size that is not
                # hex): its app waits for a body that will never come, and would hold the
                # connection until the client gave up. It is told the client left (its
                # receive() says http.disconnect, its writes are dropped), and the 400 goes
                # out now, unless its answer has begun: then the connection just ends.
                cycle.disconnected = True
                cycle.message_event.set()
                if cycle.response_started:
                    self.close_now()
                    return
            else:
                # NOTE: the bytes refused came after a request still being answered (a pipelined
                # request, a Content-Length that was short): that answer goes out whole first, then
                # this one (on_response_complete); written now, the app's next write would fail.
                self._deferred = raw
                return
        self.transport.write(raw)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._timer = self.loop.call_later(LINGER_S, self.transport.abort)
            self.flow.resume_reading()
        else:
            self.transport.close()
            if self.transport.get_write_buffer_size():
                self._arm_stall()  # a client that reads nothing must not keep the socket


async def _busy(scope: dict[str, Any], receive: Any, send: Any) -> None:
    refusal = HTTPError(503, "Busy", "every connection but those kept for probes is busy "
                        "(server.max_connections, server.ops_connections); retry", "server",
                        {"Connection": "close", "Retry-After": "1"})
    await response(refusal)(scope, receive, send)


def limited_protocol(s: ServerConfig) -> type[LimitedProtocol]:
    """A ``LimitedProtocol`` class of its own for one server (its connections are counted
    together)."""
    guard = ConnectionGuard(s, fit_descriptors(s.max_connections))
    return type("LimitedProtocol", (LimitedProtocol,), {"guard": guard})


def uvicorn_options(s: ServerConfig, app: Any = None) -> dict[str, Any]:
    """The ``uvicorn.Config`` arguments that bound the server's resources. ``app``: the
    ``create_app`` app they serve; its ``/metrics`` then counts their refusals."""
    protocol = limited_protocol(s)
    served = getattr(getattr(app, "state", None), "served", None)
    if served is not None:
        served.connections = protocol.guard
    return {"http": protocol, "ws": "none", "timeout_keep_alive": s.keepalive_timeout_s}


__all__ = ["REASONS", "ConnectionGuard", "LimitedProtocol", "limited_protocol", "uvicorn_options"]
