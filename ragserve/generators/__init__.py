"""Generator backends, chosen by ``generate.backend``; the pipeline asks ``make_generator``.

- ``vllm`` (the default): ``ragserve.generators.vllm.VllmGenerator``, vLLM's ``AsyncLLM`` in this
  process; options in ``[vllm]``.
- ``openai``: ``ragserve.generators.openai.OpenAIGenerator``, remote OpenAI-compatible
  servers (vLLM's own); options in ``[openai]``.

``make_generators`` builds one per named model of ``[models]``, sharing one vLLM engine
between models that differ only in sampling.

Both follow the ``types.Generator`` protocol, as does any object given to
``RAG.from_index(..., generator=...)``. Nothing heavy is imported here: each backend's
module is imported when it is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragserve.config import RAGConfig
    from ragserve.types import Generator


def make_generator(config: RAGConfig) -> Generator:
    """The generator ``config.generate.backend`` names, built but not started
    (``warm_up()`` starts it: the vLLM engine, or the HTTP clients and the tokenizer).

    **Usage:** ``gen = make_generator(RAGConfig.load()); gen.warm_up()``
    """
    if config.generate.backend == "openai":
        from ragserve.generators.openai import OpenAIGenerator

        return OpenAIGenerator(config.generate, config.openai)
    from ragserve.generators.vllm import VllmGenerator

    return VllmGenerator(config.generate, config.vllm)


def make_generators(configs: Mapping[str, RAGConfig], given: Mapping[str, Generator] | None = None
                    ) -> dict[str, Generator]:
    """One generator per named model (``[models]``), built but not started: ``given`` ones
    as they are, the others by ``make_generator``, except that a vLLM model whose engine
    settings (``VllmGenerator.engine_key``: the model folder, context length, scheduling,
    ``[vllm]``) match a generator already there shares that one's engine instead of
    starting a second engine for the same weights: only its sampling differs.

    **Usage:** ``gens = make_generators({n: cfg.model_config(n) for n in cfg.models.names})``
    """
    out: dict[str, Generator] = dict(given or {})
    engines: dict[Any, Any] = {}
    for gen in out.values():
        key = getattr(gen, "engine_key", None)
        if key is not None:
            engines.setdefault(key(), gen)
    for name, config in configs.items():
        if name in out:
            continue
        gen = make_generator(config)
        key = getattr(gen, "engine_key", None)
        if key is not None:
            owner = engines.setdefault(key(), gen)
            if owner is not gen:
                gen = owner.sharing(config.generate)
        out[name] = gen
    return out
