import subprocess
import sys

import ragserve

EXPECTED = [
    "BuildReport", "Chunk", "ChunkConfig", "ClusterError", "ConfigError", "DatasetError",
    "DeadlineExceededError",
    "DoneEvent", "EmbedConfig", "EmptyQuestionError", "EngineDeadError", "EvalReport",
    "GenerateConfig", "GenerationError", "GeneratorUnavailableError", "IndexConfig", "IndexIntegrityError", "IndexMismatchError",
    "IndexNotFoundError", "IngestError", "InputError", "InvalidParameterError", "InvalidTextError",
    "ModelError", "OpenAIConfig", "OverloadedError", "QueryConfig", "QueryResult", "QuestionTooLongError", "QuestionTypeError", "RAG", "RAGConfig", "RagIndexError",
    "RagserveError", "Source", "SourcesEvent", "StreamEvent", "Timings", "TokenEvent", "TokenUsage",
    "VllmConfig", "__version__", "build_index", "evaluate", "verify_index",
]
# Added with the wings: the seams a plug-in author needs, and the errors that moved into errors.py.
EXPECTED = sorted(EXPECTED + ["BatchInputError", "Embedder", "Generator", "NoL2Error", "RedisServerError",
                              "RequestObserver", "make_generator"])
# Added with the client wing: the HTTP clients and the errors only they raise.
EXPECTED = sorted(EXPECTED + ["AsyncClient", "AuthError", "Client", "RemoteError", "ServerUnreachableError"])
# Added with sharded indexes: the refusal that names the shard.
EXPECTED = sorted(EXPECTED + ["ShardError", "ShardUnavailableError"])
# Added with per-tenant quotas: the 429 of an API key over its own bucket.
EXPECTED = sorted(EXPECTED + ["QuotaExceeded"])
# Added with the integrations wing: the errors of its adapters (the adapters stay in their modules).
EXPECTED = sorted(EXPECTED + ["FrameworkNotInstalledError", "IntegrationError"])
# Added with a choice of model per request: the 400 (404 on OpenAI routes) of an unknown model.
EXPECTED = sorted(EXPECTED + ["UnknownModelError"])
# Added with partial answers from a sharded index: what retrieve returns (a list that names missing shards).
EXPECTED = sorted(EXPECTED + ["Sources"])


def test_public_names_are_pinned_and_sorted():
    assert ragserve.__all__ == EXPECTED
    assert ragserve.__all__ == sorted(ragserve.__all__)
    for name in ragserve.__all__:
        assert hasattr(ragserve, name), name


def test_import_stays_light():
    code = "import sys, ragserve; print(sorted(m for m in ('torch','faiss','vllm','sentence_transformers','llama_index','httpx','opentelemetry') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_error_is_a_ragserve_error_with_a_stage():
    for name in ragserve.__all__:
        obj = getattr(ragserve, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ragserve.RagserveError)
            assert obj.stage
