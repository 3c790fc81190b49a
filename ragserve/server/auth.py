"""API keys → tenant namespaces.

The keys file is JSON: ``{"KEY": "namespace", ...}``, or per key an object with the
tenant's name, priority class and quota (``tenants.py``). With keys, a request's namespace
is the one its key maps to, never the one in its body, so tenant A can never read tenant
B's cached answers. Keys are compared in constant time, and every key is compared, so the
time taken says nothing about which key (or how much of one) matched.

With keys, ``KeyCheck`` refuses a ``/v1`` request without a valid key (401) before
anything else looks at it: its body is neither read nor validated, so an unauthenticated
client learns nothing of the schemas.

The admin key (``server.admin_key``, or the file ``server.admin_key_file``) needs 16+
characters, as API keys do.

**Usage:** ``keys = ApiKeys.load("keys.json"); namespace = keys.namespace(authorization_header)``
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import orjson

from ragserve.config import ServerConfig
from ragserve.errors import ConfigError
from ragserve.server.httperrors import HTTPError, response
from ragserve.server.tenants import Tenant, parse_entry

MIN_KEY_CHARS = 16


class ApiKeys:
    def __init__(self, keys: dict[str, str | Tenant]) -> None:
        """``keys``: key → namespace, or key → ``Tenant``."""
        self._keys = [(k.encode(), t if isinstance(t, Tenant) else Tenant(t, t)) for k, t in keys.items()]

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        p = Path(path)
        try:
            data = orjson.loads(p.read_bytes())
        except FileNotFoundError:
            raise ConfigError("server.api_keys_file", f"{p} does not exist") from None
        except orjson.JSONDecodeError as e:
            raise ConfigError("server.api_keys_file", f"{p} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not data:
            raise ConfigError("server.api_keys_file", f"{p} must be a JSON object mapping key to namespace")
        tenants: dict[str, str | Tenant] = {}
        for key, entry in data.items():
            if len(key) < MIN_KEY_CHARS:
                raise ConfigError("server.api_keys_file", f"{p}: every key needs 16+ characters")
            tenants[key] = parse_entry(key, entry, str(p))
        return cls(tenants)

    @property
    def tenants(self) -> list[Tenant]:
        """Every tenant of the file, once per name (the bounded set of metric labels)."""
        return list({t.name: t for _, t in self._keys}.values())

    def __len__(self) -> int:
        return len(self._keys)

    def namespace(self, authorization: str | None) -> str:
        """The namespace of the bearer key in an ``Authorization`` header; 401 otherwise."""
        return self.tenant(authorization).namespace

    def tenant(self, authorization: str | None) -> Tenant:
        """The tenant of the bearer key in an ``Authorization`` header; 401 otherwise."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("missing API key: send 'Authorization: Bearer KEY'")
        presented = token.strip().encode()
        found = None
        for key, tenant in self._keys:  # no early exit: the time is the same whichever matches
            if hmac.compare_digest(presented, key):
                found = tenant
        if found is None:
            raise unauthorized("the API key is not valid")
        return found


class KeyCheck:
    """ASGI middleware: with keys, a ``/v1`` or ``/mcp`` request needs a valid key before
    its body is read or validated (401 first, never the schema's 422 to a client without a
    key; no MCP session for it). A ``/mcp`` request's ``scope["user"]`` is then
    ``user(key, namespace)`` (``mcp_http.key_user``), to which the MCP SDK binds the
    sessions it opens."""

    def __init__(self, app: Any, keys: ApiKeys, user: Any = None) -> None:
        self.app = app
        self.keys = keys
        self.user = user

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if path.startswith("/v1/") or path == "/mcp":
            header = next((v for k, v in scope.get("headers") or () if k == b"authorization"), b"").decode("latin-1")
            try:
                namespace = self.keys.namespace(header)
                # The key's namespace, never the key: the access line's tenant (server/logs.py).
                scope.setdefault("state", {})["tenant"] = namespace
            except HTTPError as e:
                return await response(e)(scope, receive, send)
            if path == "/mcp" and self.user is not None:
                scope["user"] = self.user(header.partition(" ")[2].strip(), namespace)
        await self.app(scope, receive, send)


def load_admin_key(s: ServerConfig) -> str:
    """``server.admin_key``, or the content of ``server.admin_key_file`` (stripped)."""
    if s.admin_key or not s.admin_key_file:
        return s.admin_key
    p = Path(s.admin_key_file)
    try:
        key = p.read_text("utf-8").strip()
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError("server.admin_key_file", f"{p} does not exist or is not a file") from None
    if len(key) < MIN_KEY_CHARS:
        raise ConfigError("server.admin_key_file", f"{p}: the key needs {MIN_KEY_CHARS}+ characters")
    return key


def check_admin(admin_key: str, authorization: str | None) -> None:
    scheme, _, token = (authorization or "").partition(" ")
    if not admin_key:
        raise HTTPError(404, "NotFound", "admin endpoints are off (set server.admin_key)")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_key.encode()):
        raise unauthorized("the admin key is missing or not valid")


def unauthorized(message: str) -> HTTPError:
    return HTTPError(401, "Unauthorized", message, "auth", {"WWW-Authenticate": "Bearer"})
