"""Configuration: one typed, frozen dataclass per section, one module per section.

**Usage:**

    from ragserve.config import RAGConfig
    cfg = RAGConfig.load("ragserve.toml")       # defaults, the TOML file, then RAGSERVE_* env vars

``rag.py`` holds ``RAGConfig`` (loading, validation, the answer fingerprint); the sections
are ``retrieval.py`` (``[chunk]``, ``[embed]``, ``[index]``), ``query.py``, ``prompt.py``,
``generate.py``, ``generators.py`` (``[vllm]``, ``[openai]``), ``models.py`` (``[models]``), ``cache.py``, ``semantic.py``, ``server.py``,
``ray.py`` and ``telemetry.py``; ``home.py`` says where ragserve keeps its files. This folder imports no
other wing of ragserve (an import contract in ``pyproject.toml`` checks it).
"""

from ragserve.config.cache import CacheConfig
from ragserve.config.generate import GenerateConfig
from ragserve.config.generators import OpenAIConfig, VllmConfig
from ragserve.config.home import LOOPBACK_HOSTS, data_home
from ragserve.config.models import ModelsConfig, ModelSpec
from ragserve.config.prompt import PROMPT_TEMPLATE_VERSION, PromptConfig
from ragserve.config.query import QueryConfig
from ragserve.config.rag import RAGConfig, serve_config
from ragserve.config.ray import RayConfig
from ragserve.config.retrieval import ChunkConfig, EmbedConfig, IndexConfig
from ragserve.config.semantic import SemanticConfig
from ragserve.config.server import ServerConfig
from ragserve.config.telemetry import TelemetryConfig

__all__ = [
    "LOOPBACK_HOSTS",
    "PROMPT_TEMPLATE_VERSION",
    "CacheConfig",
    "ChunkConfig",
    "EmbedConfig",
    "GenerateConfig",
    "IndexConfig",
    "ModelSpec",
    "ModelsConfig",
    "OpenAIConfig",
    "PromptConfig",
    "QueryConfig",
    "RAGConfig",
    "RayConfig",
    "SemanticConfig",
    "ServerConfig",
    "TelemetryConfig",
    "VllmConfig",
    "data_home",
    "serve_config",
]
