"""The served models (``[models]``) and which one a request gets.

Each named model has its own config (``RAGConfig.model_config``), answer fingerprint (its
cache keys, semantic partition and single-flight runs are its own), generator and prompt
builder (its ``max_tokens`` sets the prompt's token budget). Models that differ only in
sampling share one vLLM engine (``generators.make_generators``).

A request names a model, or gets the default, or (``route = "auto"``) the router's pick:
``Routed`` is keyed as a model of its own (its fingerprint covers the rule and both
models), so an L1 hit needs no retrieval; its run retrieves as every miss does, reads the
signal off the scores and generates with the model it picks; the answer is stored under
the routed key and under the picked model's own key.

With no ``[models]``, one unnamed ``Model`` stands for ``[generate]``: everything is as it
was (its fingerprint is ``RAGConfig.fingerprint()``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragserve.config import RAGConfig
from ragserve.config.models import AUTO
from ragserve.errors import UnknownModelError
from ragserve.types import Generator, Source


@dataclass(eq=False)
class Model:
    """One model as the pipeline uses it."""

    name: str
    """Its ``[models]`` name; "" for the one ``[generate]`` model when none is configured."""
    config: RAGConfig
    fingerprint: str
    generator: Generator | None = None
    builder: Any = field(default=None, repr=False)

    def label(self) -> str:
        """What a result's ``model`` says: the configured name, else the generator's model."""
        return self.name or str(getattr(self.generator, "model_name", "") or "")


@dataclass(eq=False)
class Routed:
    """``route = "auto"``: ``small`` unless the signal is below the threshold, then ``large``."""

    small: Model
    large: Model
    signal: str
    threshold: float
    name: str = AUTO
    fingerprint: str = ""

    def __post_init__(self) -> None:
        rule = f"{AUTO}:{self.signal}:{self.threshold!r}:{self.small.fingerprint}:{self.large.fingerprint}"
        self.fingerprint = hashlib.sha256(rule.encode()).hexdigest()

    def pick(self, sources: Sequence[Source]) -> Model:
        return self.large if route_signal(self.signal, sources) < self.threshold else self.small


def route_signal(signal: str, sources: Sequence[Source]) -> float:
    """How sure retrieval is: the best score ("top_score"), or best minus second best
    ("score_gap"; the best score when only one source came back). No source: -inf (hard)."""
    scores = sorted((float(s.score) for s in sources), reverse=True)
    if not scores:
        return float("-inf")
    if signal == "score_gap":
        return scores[0] - scores[1] if len(scores) > 1 else scores[0]
    return scores[0]


class Models:
    """Every model a pipeline serves; ``choose`` resolves a request's ``model``."""

    def __init__(self, config: RAGConfig, generator: Generator | None,
                 generators: Mapping[str, Generator] | None = None) -> None:
        m = config.models
        self.config = config
        self.named: dict[str, Model] = {n: Model(n, config.model_config(n), config.model_fingerprint(n))
                                        for n in m.names}
        if generators and not self.named:
            raise UnknownModelError(next(iter(generators)), ())
        for name in generators or {}:
            if name not in self.named:
                raise UnknownModelError(name, tuple(self.named))
        self.default = (self.named[m.default_name] if self.named
                        else Model("", config, config.fingerprint(), generator))
        self._given = dict(generators or {})
        if generator is not None and self.named:
            self._given.setdefault(self.default.name, generator)
        for name, model in self.named.items():
            model.generator = self._given.get(name)
        self.auto = (Routed(self.named[m.route_small], self.named[m.route_large], m.route_signal,
                            m.route_threshold) if m.route == AUTO else None)

    @property
    def names(self) -> tuple[str, ...]:
        """The configured names (empty with no ``[models]``), default first."""
        return tuple(sorted(self.named, key=lambda n: n != self.default.name))

    def all(self) -> list[Model]:
        return list(self.named.values()) or [self.default]

    def choose(self, model: object) -> Model | Routed:
        """The request's model: ``None`` is the router's pick (``route = "auto"``) or the
        default; a name must be configured ("auto" too), else ``UnknownModelError``."""
        if model is None:
            return self.auto or self.default
        if isinstance(model, str):
            if model == AUTO and self.auto is not None:
                return self.auto
            if model in self.named:
                return self.named[model]
            if not self.named and model and model == self.default.label():
                return self.default
        known = self.names + ((AUTO,) if self.auto else ()) if self.named else (self.default.label(),)
        raise UnknownModelError(model, tuple(k for k in known if k))

    def ensure(self, model: Model) -> Generator:
        """``model``'s generator, started (on the engine loop: a backend may bind to it)."""
        if model.generator is None:
            self._build()
        assert model.generator is not None
        model.generator.warm_up()
        return model.generator

    def _build(self) -> None:
        from ragserve.generators import make_generator, make_generators

        if not self.named:
            self.default.generator = make_generator(self.config)
            return
        built = make_generators({n: m.config for n, m in self.named.items()}, self._given)
        for name, model in self.named.items():
            model.generator = model.generator or built[name]

    def generators(self) -> list[Generator]:
        """The generators built so far, each once (views sharing an engine included)."""
        seen: dict[int, Generator] = {}
        for model in self.all():
            if model.generator is not None:
                seen.setdefault(id(model.generator), model.generator)
        return list(seen.values())

    def builder(self, model: Model, generator: Generator) -> Any:
        """``model``'s prompt builder: its ``max_tokens`` sets the prompt's token budget."""
        if model.builder is None:
            from ragserve.generators.prompt import PromptBuilder

            g = model.config.generate
            model.builder = PromptBuilder(generator.tokenizer(), g.max_model_len, g.max_tokens,
                                          model.config.prompt)
        return model.builder

    def describe(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: each model's name and what it runs."""
        out = []
        for model in self.all():
            g = model.config.generate
            out.append({"id": model.label(), "backend": g.backend, "max_tokens": g.max_tokens,
                        "temperature": g.temperature, "default": model is self.default and self.auto is None})
        if self.auto is not None:
            out.append({"id": AUTO, "backend": "route", "small": self.auto.small.name,
                        "large": self.auto.large.name,
                        "signal": self.auto.signal, "threshold": self.auto.threshold, "default": True})
        return out
