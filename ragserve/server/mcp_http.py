"""``/mcp``: the MCP tools (``mcp_tools.py``) over Streamable HTTP, in ``ragserve serve``'s
own app, beside ``/v1``.

- **Transport**: the SDK's ``StreamableHTTPSessionManager``: a 2026-07-28 client sends one
  self-contained POST per call; an older one opens a session with ``initialize``
  (``Mcp-Session-Id``) and ends it with DELETE. ``GET /mcp`` (a stream for messages the
  server starts on its own) is 405, which the spec allows: these tools never send one, and
  every ``/mcp`` request is then a bounded exchange, so SIGTERM's drain and the connection
  limits (``limits.py``) treat it as any ``/v1`` request.
- **Keys**: with ``server.api_keys_file``, ``KeyCheck`` refuses a ``/mcp`` request without
  a valid key (401, the same body as ``/v1``) before the SDK sees it: no session is created
  for it. The key's namespace is the tenant of ``answer`` (per call, from the call's own
  request), and a session is bound to the key that opened it (the SDK answers another
  key's request for it with 404).
- **Lifecycle**: the session manager runs inside the app's lifespan (``create_app``):
  started before the first request, and at shutdown its sessions end before the engine
  closes.
- **Replicas**: with ``server.mcp_stateless`` (``serve --ray`` sets it) there are no
  sessions: any replica answers any request, and an ``initialize`` opens nothing.
- **Limits**: request bodies over ``server.max_body_bytes`` are refused (413) by the
  server's middleware as on ``/v1``; ``server.mcp_max_sessions`` open sessions at most (503
  past it), each closed after ``server.mcp_session_idle_s`` without a request.
"""

from __future__ import annotations

import hashlib
from typing import Any

from mcp.server import MCPServer
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import Context
from mcp.server.transport_security import TransportSecuritySettings
from starlette.routing import Route

from ragserve.config import LOOPBACK_HOSTS, ServerConfig
from ragserve.server.httperrors import HTTPError, response
from ragserve.server.mcp_tools import build_mcp

PATH = "/mcp"
ALLOW = "POST, DELETE"


def add_mcp_route(app: Any, served: Any, version: str = "") -> MCPServer:
    """Route ``/mcp`` of ``app`` to a new MCP server over ``served.rag``; the caller runs
    ``server.session_manager.run()`` in the app's lifespan."""
    s: ServerConfig = served.config.server
    server = build_mcp(lambda: served.rag, tenant_of=lambda ctx: _tenant(served, ctx),
                       request_id_of=_request_id, version=version)
    # NOTE: the SDK's own app is not mounted (its lifespan would never run, and a Mount
    # answers "/mcp" only with a redirect to "/mcp/"): its one route is taken instead.
    # json_response: each call's reply is one JSON body, not an SSE stream (a stream per POST
    # that carries one message, framed and parsed as events on both sides). The cost: no
    # message of the server's own within a call (progress, logging, sampling), which these
    # tools never send.
    sdk_app = server.streamable_http_app(streamable_http_path=PATH, stateless_http=s.mcp_stateless,
                                         json_response=True,
                                         max_request_body_size=s.max_body_bytes,
                                         session_idle_timeout=s.mcp_session_idle_s,
                                         max_sessions=s.mcp_max_sessions,
                                         transport_security=_host_checks(s), host=s.host)
    (route,) = [r for r in sdk_app.routes if isinstance(r, Route) and r.path == PATH]
    app.router.routes.append(Route(PATH, endpoint=_NoStandaloneStream(route.app), include_in_schema=False))
    return server


def key_user(key: str, namespace: str) -> AuthenticatedUser:
    """The SDK's user for an API key: its sessions are bound to this key (``subject``: a
    hash of the key, never the key itself), and ``client_id`` is the tenant."""
    subject = hashlib.sha256(key.encode()).hexdigest()[:32]
    return AuthenticatedUser(AccessToken(token="", client_id=namespace, scopes=[], subject=subject))


class _NoStandaloneStream:
    """``GET /mcp`` is 405 (see the module docstring); the rest goes to the SDK."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["method"] == "GET":
            refusal = HTTPError(405, "MethodNotAllowed", "GET /mcp: this server sends no message of its own; "
                                "POST requests to /mcp (Streamable HTTP)", "http", {"Allow": ALLOW})
            return await response(refusal)(scope, receive, send)
        await self.app(scope, receive, send)


def _host_checks(s: ServerConfig) -> TransportSecuritySettings | None:
    """On loopback, the Host and Origin checks the MCP spec asks for against DNS
    rebinding (a web page's script reaching a local server); bound elsewhere, the API
    keys are the guard."""
    if s.host not in LOOPBACK_HOSTS:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"])


def _tenant(served: Any, ctx: Context) -> str | None:
    if served.keys is None:  # before the request context: no keys, no tenant, per call
        return None
    request = ctx.request_context.request
    if request is None:
        return None
    return served.keys.namespace(request.headers.get("authorization"))


def _request_id(ctx: Context) -> str | None:
    request = ctx.request_context.request
    state = getattr(request, "scope", {}).get("state") or {}
    return state.get("request_id")
