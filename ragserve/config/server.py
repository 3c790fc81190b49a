"""``[server]``: ``ragserve serve``, the HTTP service."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """``ragserve serve``: the HTTP service. None of it changes an answer.

    **Usage:** ``RAGSERVE_SERVER_PORT=9000 ragserve serve indexes/docs`` or a ``[server]``
    table in the TOML config; the CLI options override both.
    """

    host: str = "127.0.0.1"
    """Address to bind. Without API keys the default stays on loopback."""
    port: int = 8000
    api_keys_file: str = ""
    """A JSON file mapping API key → namespace (tenant). With it, every /v1 request needs
    ``Authorization: Bearer KEY`` and its namespace comes from the key, never the body."""
    admin_key: str = ""
    """Key for /admin endpoints ("" turns them off; else 16+ characters). Give it as
    ``RAGSERVE_SERVER_ADMIN_KEY`` or in ``admin_key_file``: a command line is visible to
    every user of the machine (``ps``)."""
    admin_key_file: str = ""
    """A file whose content (stripped) is the admin key, e.g. a mounted secret; used when
    ``admin_key`` is empty."""
    max_body_bytes: int = 64 * 1024
    """Larger request bodies are refused with 413 before they are read."""
    drain_grace_s: float = 30.0
    """On SIGTERM: how long requests in flight may take to finish before they are aborted."""
    retry_after_s: int = 1
    """The Retry-After header of a 429 (seconds)."""
    quota_redis_url: str = ""
    """Where the API keys' quota buckets live (``server/quotas.py``): "" in this process;
    a redis:// URL to share them between processes (``serve --ray`` uses
    ``cache.redis_url`` when this is empty). While it does not answer, requests are
    admitted and counted (fail open)."""

    # Bounds on what clients hold of the server (ragserve/server/limits.py; docs/serving.md).
    max_header_bytes: int = 32 * 1024
    """Request line and headers together; past it: 431 and the connection closed."""
    max_headers: int = 100
    """Header fields per request; past it: 431 and the connection closed."""
    header_timeout_s: float = 10.0
    """From the connection (or a keep-alive request's first byte) to the end of the
    headers; past it: 408 and closed (closed silently if nothing was sent)."""
    body_timeout_s: float = 30.0
    """From the end of the headers to the end of the body; past it: 408 and closed."""
    keepalive_timeout_s: float = 5.0
    """An idle keep-alive connection is closed after this long."""
    max_connections: int = 4096
    """Open connections. Past it, the oldest one with no request in progress is closed to
    make room; if every one is busy, a new one gets 503 at once. Lowered, with a warning, to
    what the descriptor limit allows (which is raised to fit when it can be)."""
    ops_connections: int = 16
    """Of ``max_connections``, kept for /health, /ready and /metrics: other requests get 503
    when only these are left."""
    log_format: str = "text"
    """"text": log lines as ``time level logger message``; "json": one JSON object per line,
    the access line's fields as keys (request id, trace id, tenant, outcome, cache tier,
    status, total ms; ``ragserve/server/logs.py``)."""
    send_timeout_s: float = 30.0
    """A response the client does not read: the connection is reset once the client has
    acknowledged none of its bytes for this long (a stalled SSE stream ends)."""

    # MCP at /mcp (ragserve/server/mcp_http.py; docs/mcp.md).
    mcp: bool = True
    """Serve the MCP tools (``retrieve``, ``answer``) at /mcp, Streamable HTTP, with the same
    API keys as /v1."""
    mcp_stateless: bool = False
    """Serve MCP without sessions: every request stands alone, so any replica can answer
    it (``serve --ray`` sets it: its proxy spreads a client's requests over replicas)."""
    mcp_max_sessions: int = 1000
    """Open MCP sessions (clients of protocol versions before 2026-07-28); a new one past it
    gets 503 until one ends."""
    mcp_session_idle_s: float = 600.0
    """An MCP session with no request for this long is closed (its client opens another)."""
