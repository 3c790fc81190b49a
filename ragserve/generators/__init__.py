"""Generator backends, chosen by ``generate.backend``; the pipeline asks ``make_generator``.

- ``vllm`` (the default): ``ragserve.generators.vllm.VllmGenerator``, vLLM's ``AsyncLLM`` in this
  process; options in ``[vllm]``.
- ``openai``: ``ragserve.generators.openai.OpenAIGenerator``, remote OpenAI-compatible
  servers (vLLM's own); options in ``[openai]``.

Both follow the ``types.Generator`` protocol, as does any object given to
``RAG.from_index(..., generator=...)``. Nothing heavy is imported here: each backend's
module is imported when it is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
