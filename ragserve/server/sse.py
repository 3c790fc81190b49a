"""Server-Sent Events framing (https://html.spec.whatwg.org/multipage/server-sent-events.html).

One event is ``event: NAME`` (optional) and ``data: JSON``, ended by a blank line; JSON
never holds a raw newline, so one ``data:`` line always suffices."""

from __future__ import annotations

from typing import Any

import orjson

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""No proxy buffering: tokens must reach the client as they are generated."""


def frame(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


DONE = b"data: [DONE]\n\n"
"""The OpenAI stream's last frame."""
