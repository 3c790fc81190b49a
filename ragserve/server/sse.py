"""Server-Sent Events framing (https://html.spec.whatwg.org/multipage/server-sent-events.html).

One event is ``event: NAME`` (optional) and ``data: JSON``, ended by a blank line; JSON
never holds a raw newline, so one ``data:`` line always suffices.

Token streams are written in ``batches``, each ``coalesce``-d: whatever reached the
server's loop since the writer last looked goes out in one write, with consecutive token
pieces joined into one event. A writer that keeps up sends every piece as it comes
(nothing ever waits to be batched); one that fell behind (a busy machine, a slow client)
catches up with one frame and one write instead of one per token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from ragserve.types import StreamEvent, TokenEvent

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""No proxy buffering: tokens must reach the client as they are generated."""


def frame(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def token_frame(text: str) -> bytes:
    """``frame({"text": text}, "token")``, byte for byte, without a dict per token."""
    return b'event: token\ndata: {"text":' + orjson.dumps(text) + b"}\n\n"


DONE = b"data: [DONE]\n\n"
"""The OpenAI stream's last frame."""


def batches(events: AsyncIterator[StreamEvent]) -> AsyncIterator[list[StreamEvent]]:
    """``events`` in lists of those that had arrived when the writer looked: an engine
    stream's own (``Relay.batches``); any other iterator's one at a time."""
    own = getattr(events, "batches", None)
    return own() if own is not None else _singles(events)


def coalesce(batch: list[StreamEvent]) -> list[StreamEvent]:
    """``batch`` with each run of consecutive ``TokenEvent`` pieces joined into one (the
    texts add up to the same); a batch of one comes back as it is."""
    if len(batch) == 1:
        return batch
    out: list[StreamEvent] = []
    run: list[TokenEvent] = []
    for event in [*batch, None]:
        if isinstance(event, TokenEvent):
            run.append(event)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else TokenEvent("".join(t.text for t in run)))
            run = []
        if event is not None:
            out.append(event)
    return out


async def _singles(events: AsyncIterator[StreamEvent]) -> AsyncIterator[list[StreamEvent]]:
    async for event in events:
        yield [event]


async def read_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str | None, str]]:
    """The client's side of ``frame``: ``(event name or None, data text)`` for each
    ``data:`` line of a stream read line by line (``httpx.Response.aiter_lines()``)."""
    event = None
    async for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, line[6:]
        elif not line:
            event = None  # a blank line ends the event: the next one names its own
