"""What the keys file says about each API key's tenant: its namespace, the name it is
counted under, its priority class, and its quota.

An entry is either the namespace alone (``"KEY": "acme"``) or an object::

    "KEY": {"namespace": "acme", "name": "acme-batch",
            "priority": 10, "max_priority": 5,
            "requests_per_s": 2, "burst": 10, "tokens_per_min": 6000}

- ``name`` (default: the namespace) labels the tenant's series in ``/metrics`` and names
  its token buckets: keys with one name share one bucket (e.g. an old and a new key
  during a rotation). It comes from this file only, never from a request, so the label's
  values are bounded by the file.
- ``priority`` (default 0): the class of a request that asks none. ``max_priority``
  (default: ``priority``): the most urgent class the key may ask for, as a number; a
  request asking a lower number (sooner) is refused with 400. Lower runs sooner.
- ``requests_per_s`` with ``burst`` (default: ``requests_per_s`` rounded up, at least 1),
  ``tokens_per_min`` (generated tokens; its burst is one minute's worth): 0 or absent is
  no limit (``quotas.py``).

**Usage:** ``tenant = parse_entry(key, value, where)``
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ragserve.engine.validation import PRIORITY_LIMIT, check_namespace, check_priority
from ragserve.errors import ConfigError, InputError, InvalidParameterError

FIELD = "server.api_keys_file"
_FIELDS = {"namespace", "name", "priority", "max_priority", "requests_per_s", "burst", "tokens_per_min"}


@dataclass(frozen=True)
class Quota:
    """A key's buckets (0: no limit)."""

    requests_per_s: float = 0.0
    burst: float = 0.0
    tokens_per_min: float = 0.0

    @property
    def limited(self) -> bool:
        return self.requests_per_s > 0 or self.tokens_per_min > 0


@dataclass(frozen=True)
class Tenant:
    name: str
    namespace: str
    priority: int = 0
    max_priority: int = 0
    quota: Quota = Quota()

    def priority_of(self, asked: int | None) -> int:
        """The class a request runs in: the key's default when it asks none; what it asks
        when that is within the key's bounds; else a 400 naming the bound."""
        if asked is None:
            return self.priority
        check_priority(asked)
        if asked < self.max_priority:
            expected = (f">= {self.max_priority} for this API key (its max_priority in the keys file; "
                        "lower runs sooner)")
            raise InvalidParameterError("priority", asked, expected)
        return asked


def parse_entry(key: str, value: Any, where: str) -> Tenant:
    """One keys-file entry as a ``Tenant``; ``ConfigError`` naming the key's first
    characters and what is wrong."""
    label = f"{where}: key {key[:4]}…"
    if isinstance(value, str):
        value = {"namespace": value}
    if not isinstance(value, dict):
        raise ConfigError(FIELD, f"{label}: an entry is a namespace string or an object")
    unknown = sorted(set(value) - _FIELDS)
    if unknown:
        known = ", ".join(sorted(_FIELDS))
        raise ConfigError(FIELD, f"{label}: unknown field(s) {', '.join(unknown)}; known: {known}")
    namespace = value.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        raise ConfigError(FIELD, f"{label}: needs a non-empty namespace string")
    name = value.get("name", namespace)
    try:
        check_namespace(namespace)  # refused here, not on every request of that tenant
        check_namespace(name)  # the same rules: a bounded, printable label
    except InputError as e:
        raise ConfigError(FIELD, f"{label}: {e}") from None
    priority = _int(value, "priority", 0, label)
    max_priority = _int(value, "max_priority", priority, label)
    if max_priority > priority:
        raise ConfigError(FIELD, f"{label}: max_priority ({max_priority}) is a later class than its default "
                                 f"priority ({priority}); lower runs sooner")
    rate = _number(value, "requests_per_s", 0.0, label)
    burst = _number(value, "burst", float(max(1, math.ceil(rate))) if rate else 0.0, label)
    if rate and burst < 1:
        raise ConfigError(FIELD, f"{label}: burst must be >= 1 with requests_per_s, got {burst:g}")
    quota = Quota(rate, burst, _number(value, "tokens_per_min", 0.0, label))
    return Tenant(name, namespace, priority, max_priority, quota)


def _int(value: dict[str, Any], field: str, default: int, label: str) -> int:
    got = value.get(field, default)
    if not isinstance(got, int) or isinstance(got, bool) or not -PRIORITY_LIMIT <= got <= PRIORITY_LIMIT:
        raise ConfigError(FIELD, f"{label}: {field} must be an int in {-PRIORITY_LIMIT}..{PRIORITY_LIMIT}, "
                                 f"got {got!r}")
    return got


def _number(value: dict[str, Any], field: str, default: float, label: str) -> float:
    got = value.get(field, default)
    if not isinstance(got, (int, float)) or isinstance(got, bool) or not 0 <= got < math.inf:
        raise ConfigError(FIELD, f"{label}: {field} must be a number >= 0 (0: no limit), got {got!r}")
    return float(got)
