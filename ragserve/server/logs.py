"""Log lines of ``ragserve serve`` as text or as one JSON object per line
(``[server] log_format = "json"``), for log pipelines that index fields.

The access line of each request (``middleware.py``) carries its fields in the record
(``record.access``): request id, trace id (tracing on), tenant (the API key's namespace,
never the key), method, path, status, outcome (the ``ragserve_requests_total`` outcome the
status means), cache tier (``X-Cache``) and total ms. In JSON they are the object's keys;
other records have ``ts``, ``level``, ``logger``, ``message`` (and ``exc`` with a traceback).

**Usage:** ``configure("json")`` once at start (``ragserve serve`` does).
"""

from __future__ import annotations

import json
import logging
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 6), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """Root logging for a server process: ``text`` lines (unless the root logger already has
    a handler, as ``logging.basicConfig``), or ``json`` objects (replacing the handlers)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=log_format == "json")


def outcome(status: int) -> str:
    """The outcome label of ``ragserve_requests_total`` an HTTP status stands for."""
    if status < 400:
        return "ok"
    return {499: "cancelled", 429: "overloaded", 504: "timeout", 400: "invalid", 422: "invalid"}.get(
        status, "error" if status >= 500 else "refused")
