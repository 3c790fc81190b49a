"""The native stream (``POST /v1/query`` with ``stream=true``) read back into the events
``RAG.stream`` yields: ``sources`` → ``SourcesEvent``, ``token`` → ``TokenEvent``,
``done`` → ``DoneEvent``; an ``error`` event is raised as its typed error (see
``failures.py``). The server writes one ``data:`` line per event (``server/sse.py``);
comment lines (keep-alive pings) and events of other names are skipped."""

from __future__ import annotations

import orjson

from ragserve.client.failures import from_body
from ragserve.types import DoneEvent, QueryResult, Source, SourcesEvent, StreamEvent, TokenEvent


class EventReader:
    """Fed the stream's lines one at a time; ``feed`` returns the event a line completes."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.name: str | None = None
        self.done = False

    def feed(self, line: str) -> StreamEvent | None:
        if line.startswith("event:"):
            self.name = line[6:].strip()
            return None
        if not line:
            self.name = None  # a blank line ends the event: the next one names its own
            return None
        if not line.startswith("data:"):
            return None
        data = line[5:].lstrip(" ").encode()
        name = self.name
        if name == "token":
            return TokenEvent(orjson.loads(data)["text"])
        if name == "sources":
            d = orjson.loads(data)
            return SourcesEvent([Source.from_dict(s) for s in d["sources"]], d["cache_tier"],
                                tuple(d.get("missing_shards") or ()))
        if name == "done":
            self.done = True
            return DoneEvent(QueryResult.from_dict(orjson.loads(data)))
        if name == "error":
            raise from_body(None, data, self.request_id)
        return None
