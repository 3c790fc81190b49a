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
    """Key for /admin endpoints ("" turns them off)."""
    max_body_bytes: int = 64 * 1024
    """Larger request bodies are refused with 413 before they are read."""
    drain_grace_s: float = 30.0
    """On SIGTERM: how long requests in flight may take to finish before they are aborted."""
    retry_after_s: int = 1
    """The Retry-After header of a 429 (seconds)."""
