"""Where ragserve keeps its files, and which hosts are this machine."""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    """Where prepared models and runtime files live (``RAGSERVE_HOME``)."""
    return Path(os.environ.get("RAGSERVE_HOME", Path.home() / ".cache" / "ragserve"))


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Host names that reach only this machine (``server.host``, the ``openai`` backend's URLs)."""
