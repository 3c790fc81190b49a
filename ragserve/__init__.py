"""ragserve: a multi-tier RAG serving engine.

**Usage:**

    from ragserve import RAG
    with RAG.from_index("indexes/pydoc") as rag:
        print(rag.query("How does the with statement work?"))

The public names are listed in ``__all__`` (pinned by ``tests/test_exports.py``). Heavy
libraries (torch, faiss, vllm, httpx) load only when an index is built or opened, or a
``Client`` made. A server in another process: ``Client(url, api_key=...)`` has the same
verbs and types as ``RAG``.
"""

from ragserve._version import __version__
from ragserve.build.builder import BuildReport, build_index
from ragserve.client import AsyncClient, Client
from ragserve.config import (
    ChunkConfig,
    EmbedConfig,
    GenerateConfig,
    IndexConfig,
    OpenAIConfig,
    QueryConfig,
    RAGConfig,
    VllmConfig,
)
from ragserve.errors import (
    AuthError,
    BatchInputError,
    ClusterError,
    ConfigError,
    DatasetError,
    DeadlineExceededError,
    EmptyQuestionError,
    EngineDeadError,
    FrameworkNotInstalledError,
    GenerationError,
    GeneratorUnavailableError,
    IndexIntegrityError,
    IndexMismatchError,
    IndexNotFoundError,
    IngestError,
    InputError,
    IntegrationError,
    InvalidParameterError,
    InvalidTextError,
    ModelError,
    NoL2Error,
    OverloadedError,
    QuestionTooLongError,
    QuestionTypeError,
    QuotaExceeded,
    RagserveError,
    RedisServerError,
    RemoteError,
    ServerUnreachableError,
    ShardError,
    ShardUnavailableError,
    UnknownModelError,
)
from ragserve.errors import IndexError_ as RagIndexError
from ragserve.eval.evaluate import EvalReport, evaluate
from ragserve.generators import make_generator
from ragserve.index.verify import verify as verify_index
from ragserve.observe.observers import RequestObserver
from ragserve.rag import RAG
from ragserve.types import (
    Chunk,
    DoneEvent,
    Embedder,
    Generator,
    QueryResult,
    Source,
    Sources,
    SourcesEvent,
    StreamEvent,
    Timings,
    TokenEvent,
    TokenUsage,
)

__all__ = [
    "AsyncClient",
    "AuthError",
    "BatchInputError",
    "BuildReport",
    "Chunk",
    "ChunkConfig",
    "Client",
    "ClusterError",
    "ConfigError",
    "DatasetError",
    "DeadlineExceededError",
    "DoneEvent",
    "EmbedConfig",
    "Embedder",
    "EmptyQuestionError",
    "EngineDeadError",
    "EvalReport",
    "FrameworkNotInstalledError",
    "GenerateConfig",
    "GenerationError",
    "Generator",
    "GeneratorUnavailableError",
    "IndexConfig",
    "IndexIntegrityError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IngestError",
    "InputError",
    "IntegrationError",
    "InvalidParameterError",
    "InvalidTextError",
    "ModelError",
    "NoL2Error",
    "OpenAIConfig",
    "OverloadedError",
    "QueryConfig",
    "QueryResult",
    "QuestionTooLongError",
    "QuestionTypeError",
    "QuotaExceeded",
    "RAG",
    "RAGConfig",
    "RagIndexError",
    "RagserveError",
    "RedisServerError",
    "RemoteError",
    "RequestObserver",
    "ServerUnreachableError",
    "ShardError",
    "ShardUnavailableError",
    "Source",
    "Sources",
    "SourcesEvent",
    "StreamEvent",
    "Timings",
    "TokenEvent",
    "TokenUsage",
    "UnknownModelError",
    "VllmConfig",
    "__version__",
    "build_index",
    "evaluate",
    "make_generator",
    "verify_index",
]
