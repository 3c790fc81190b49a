"""Tell a running server that its index has a new version: ``build-index --notify URL``.

After a successful build, ``notify_reload`` POSTs to the server's reload endpoint (for
``ragserve serve``: ``http://HOST:PORT/admin/reload``) with an optional
``Authorization: Bearer KEY``. The JSON body names the index path and the new
fingerprint; the server re-resolves the path itself, so the body is informative only.

A failed notification never fails the build: the index is already in place, and the
server picks it up at its next reload or restart. The result says what happened.

**Usage:**

    result = notify_reload("http://127.0.0.1:8000/admin/reload", index="indexes/docs",
                           fingerprint=report.fingerprint, admin_key="secret")
    print(result.message)
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 30.0
"""A reload verifies the new index's hashes and maps it before answering: seconds, not ms."""


@dataclass(frozen=True)
class NotifyResult:
    ok: bool
    message: str
    status: int | None = None
    """The HTTP status, when the server answered."""


def notify_reload(url: str, *, index: str, fingerprint: str, admin_key: str | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> NotifyResult:
    """POST ``{"index": ..., "fingerprint": ...}`` to ``url``; never raises for a network
    or HTTP failure (the result carries it)."""
    import httpx  # imported here: only builds that notify need it

    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    try:
        response = httpx.post(url, json={"index": index, "fingerprint": fingerprint}, headers=headers,
                              timeout=timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        return NotifyResult(False, f"could not reach {url}: {type(e).__name__}: {e}")
    body = " ".join(response.text.split())[:200]
    if response.is_success:
        return NotifyResult(True, f"{url} answered {response.status_code}{': ' + body if body else ''}",
                            response.status_code)
    return NotifyResult(False, f"{url} answered {response.status_code}{': ' + body if body else ''}",
                        response.status_code)
