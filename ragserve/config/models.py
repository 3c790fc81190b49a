"""``[models]``: several named models behind one endpoint, a default, and an optional rule
that picks one per question (``route = "auto"``).

Each ``[models.NAME]`` table is a generator spec: the ``[generate]`` fields it changes
(``backend``, ``model``, ``max_tokens``, ``temperature``, ...) at its top level, and the
backend's own options in a ``vllm`` or ``openai`` sub-table. What it does not set comes
from ``[generate]``, ``[vllm]`` and ``[openai]``. Two models that differ only in sampling
(``max_tokens``, ``temperature``, ``top_p``, ``seed``) over the same vLLM model and engine
settings share ONE engine.

**Usage:**

    [models]
    default = "small"
    route = "auto"            # requests that name no model: "small" unless the question looks hard
    route_small = "small"
    route_large = "large"
    route_signal = "top_score"
    route_threshold = 0.47

    [models.small]            # the packaged SmolLM2 in process, short answers
    max_tokens = 32

    [models.large]            # another server
    backend = "openai"
    max_tokens = 128
    openai = { urls = ["http://gpu-1:8000"], model = "Qwen2.5-7B-Instruct" }

``RAGConfig().replace(models={"small": {"max_tokens": 32}, "default": "small"})`` does the
same from Python; ``RAGSERVE_MODELS_DEFAULT`` / ``RAGSERVE_MODELS_ROUTE`` set the scalars
(the models themselves come from the file or ``replace``). With no model configured,
nothing changes: one model, the ``[generate]`` one.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ragserve.errors import ConfigError, UnknownModelError

Route = Literal["", "auto"]
RouteSignal = Literal["top_score", "score_gap"]

AUTO = "auto"
"""The name of the routed choice: a request may ask for it explicitly when ``route = "auto"``."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_SECTIONS = ("vllm", "openai")


@dataclass(frozen=True)
class ModelSpec:
    """One ``[models.NAME]`` table: what it changes of ``[generate]``, ``[vllm]``, ``[openai]``."""

    name: str
    generate: dict[str, Any] = field(default_factory=dict)
    vllm: dict[str, Any] = field(default_factory=dict)
    openai: dict[str, Any] = field(default_factory=dict)

    def sections(self) -> dict[str, dict[str, Any]]:
        """As ``RAGConfig.replace`` takes them (only the sections it changes)."""
        pairs = (("generate", self.generate), ("vllm", self.vllm), ("openai", self.openai))
        return {k: v for k, v in pairs if v}


@dataclass(frozen=True)
class ModelsConfig:
    default: str = ""
    """The model a request that names none gets ("": the first one listed). Ignored for
    such requests when ``route = "auto"``; ``model = "ragserve"`` on the OpenAI routes means
    the same as no model."""
    route: Route = ""
    """"auto": a request that names no model (or names "auto") is routed: ``route_small``
    unless the question looks hard by ``route_signal``, then ``route_large``. "": the default."""
    route_small: str = ""
    """The cheap model the router picks for easy questions."""
    route_large: str = ""
    """The model the router picks for hard ones."""
    route_signal: RouteSignal = "top_score"
    """What "hard" is measured by, from the retrieval every miss does anyway: "top_score"
    (the best source's similarity) or "score_gap" (best minus second best). Hard when it is
    below ``route_threshold``. On XQuAD-en the small model's answers failed most below a low
    top score; the gap flagged wrong retrievals better but not wrong answers
    (docs/configuration.md, "Models")."""
    route_threshold: float = 0.47
    """The signal's cut: below it a question goes to ``route_large``. 0.47 sent the lowest
    fifth of XQuAD-en's questions (default embedder) to the large model; it depends on the
    corpus and the embedder: measure yours with ``benchmarks/bench_route_signal.py``."""
    entries: tuple[ModelSpec, ...] = ()
    """The ``[models.NAME]`` tables, in the order given."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.entries)

    @property
    def default_name(self) -> str:
        return self.default or (self.entries[0].name if self.entries else "")

    def spec(self, name: str) -> ModelSpec | None:
        return next((m for m in self.entries if m.name == name), None)

    def check(self, model: object) -> None:
        """Refuse a model the requests could not get, before anything starts (the command
        line checks ``--model`` so, not after ~20 s of engine start-up): with ``[models]``,
        a name not configured (nor "auto" under ``route = "auto"``) raises the
        ``UnknownModelError`` the engine's ``Models.choose`` would. Without ``[models]``
        the one served model's name is known only once its generator is built: the engine
        checks it then. ``None`` (no model asked for) is always fine."""
        if model is None or not self.entries:
            return
        if isinstance(model, str) and (model in self.names or (model == AUTO and self.route == AUTO)):
            return
        known = sorted(self.names, key=lambda n: n != self.default_name)
        raise UnknownModelError(model, (*known, *((AUTO,) if self.route == AUTO else ())))


_SCALARS = {f.name: f for f in dataclasses.fields(ModelsConfig) if f.name != "entries"}


def merge_models(current: ModelsConfig, values: dict[str, Any]) -> ModelsConfig:
    """``current`` with ``values`` applied: scalars (``default``, ``route``...) replace, a
    table per model merges into that model's spec (a new name adds a model). Also takes
    ``entries`` as ``to_dict()`` writes it, so a config survives the trip through a dict."""
    scalars: dict[str, Any] = {}
    entries = {m.name: m for m in current.entries}
    for key, value in values.items():
        if key == "entries":
            for item in value or ():
                spec = _spec(str(item.get("name", "")) if isinstance(item, dict) else "", item)
                entries[spec.name] = spec
        elif isinstance(value, dict):
            entries[key] = _merge_spec(entries.get(key), key, value)
        elif key in _SCALARS:
            scalars[key] = _scalar(key, _SCALARS[key].type, value)
        else:
            raise ConfigError(f"models.{key}", "unknown field; known: " + ", ".join(_SCALARS)
                              + " (or a table [models.NAME] per model)")
    return dataclasses.replace(current, **scalars, entries=tuple(entries.values()))


def _scalar(name: str, kind: Any, value: Any) -> Any:
    if kind in (float, "float"):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"models.{name}", f"expected a number, got {value!r}") from None
    if not isinstance(value, str):
        raise ConfigError(f"models.{name}", f"expected a string, got {value!r}")
    return value


def _spec(name: str, table: Any) -> ModelSpec:
    if not isinstance(table, dict):
        raise ConfigError(f"models.{name}", f"expected a table, got {table!r}")
    return ModelSpec(name, dict(table.get("generate") or {}), dict(table.get("vllm") or {}),
                     dict(table.get("openai") or {}))


def _merge_spec(spec: ModelSpec | None, name: str, table: dict[str, Any]) -> ModelSpec:
    spec = spec or ModelSpec(name)
    generate, subs = dict(spec.generate), {s: dict(getattr(spec, s)) for s in _SECTIONS}
    for key, value in table.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"models.{name}.{key}",
                                  f"expected a table of [{key}] fields, got {value!r}")
            subs[key].update(value)
        elif key == "generate" and isinstance(value, dict):  # the to_dict() form of one spec
            generate.update(value)
        else:
            generate[key] = value
    return ModelSpec(name, generate, subs["vllm"], subs["openai"])


def validate_models(m: ModelsConfig) -> None:
    """The section's own checks; ``RAGConfig`` checks each model's settings by building its
    config (``model_config``), so every message names the field as ``models.NAME.FIELD``."""
    names = m.names
    reserved = {AUTO, "ragserve", *_SCALARS, "entries"}
    for name in names:
        if not _NAME.match(name) or name in reserved:
            raise ConfigError(f"models.{name}", "a model's name must be 1-128 letters, digits or ._:/- "
                              f"(starting with a letter or digit) and not one of {sorted(reserved)}")
    if len(set(names)) != len(names):
        raise ConfigError("models", "names a model twice")
    if m.route not in get_args(Route):
        raise ConfigError("models.route", f"must be '' (off) or 'auto', got {m.route!r}")
    if m.route_signal not in get_args(RouteSignal):
        raise ConfigError("models.route_signal",
                          f"must be 'top_score' or 'score_gap', got {m.route_signal!r}")
    if not names:
        for key in ("default", "route", "route_small", "route_large"):
            if getattr(m, key):
                raise ConfigError(f"models.{key}",
                                  "is set but no model is configured: add a [models.NAME] table")
        return
    for key in ("default", "route_small", "route_large"):
        value = getattr(m, key)
        if value and value not in names:
            raise ConfigError(f"models.{key}",
                              f"names no configured model: {value!r}; configured: {', '.join(names)}")
    if m.route == AUTO:
        if not m.route_small or not m.route_large or m.route_small == m.route_large:
            raise ConfigError("models.route", "'auto' needs route_small and route_large: two different "
                              "configured models")
