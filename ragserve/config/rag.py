"""``RAGConfig``: every section together, loaded from TOML and env vars, validated in one place.

**Usage:**

    cfg = RAGConfig.load()                      # defaults + RAGSERVE_* env vars
    cfg = RAGConfig.load("ragserve.toml")       # a TOML file, then env vars on top
    cfg = cfg.replace(generate={"max_tokens": 128})

Env vars are named ``RAGSERVE_<SECTION>_<FIELD>``, e.g. ``RAGSERVE_GENERATE_MODEL``,
``RAGSERVE_QUERY_TOP_K`` or ``RAGSERVE_OPENAI_URLS`` (a list: comma-separated). Validation
happens in one place (``_validate``) and every message names the field and the allowed
values. Each section is defined in its own module of this folder (``retrieval.py`` for
``[chunk]``/``[embed]``/``[index]``, ``generators.py`` for ``[vllm]``/``[openai]`` with the
migration of the vLLM options that used to sit under ``[generate]``, ``ray.py`` for
``[ray]``, ``models.py`` for ``[models]``, ...). ``model_config(name)`` is the config one
named model answers with; ``model_fingerprint(name)`` its answer fingerprint.

``fingerprint()`` hashes only the fields that change an answer (models, sampling,
prompt template, top_k, the index's query-time search settings), never batch sizes, URLs
or timeouts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

import orjson
import tomllib

from ragserve.config.cache import CacheConfig
from ragserve.config.generate import GenerateConfig, Scheduling
from ragserve.config.generators import OpenAIConfig, VllmConfig, migrate_legacy, validate_backends
from ragserve.config.home import data_home
from ragserve.config.models import ModelsConfig, merge_models, validate_models
from ragserve.config.prompt import PROMPT_TEMPLATE_VERSION, PromptConfig, validate_prompt
from ragserve.config.query import QueryConfig
from ragserve.config.ray import RayConfig, validate_ray
from ragserve.config.retrieval import ChunkConfig, Device, EmbedConfig, IndexConfig, IndexType, Precision
from ragserve.config.semantic import SemanticConfig, validate_semantic
from ragserve.config.server import ServerConfig
from ragserve.config.telemetry import TelemetryConfig, validate_telemetry
from ragserve.errors import ConfigError


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
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)

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
            kwargs[name] = (merge_models(current, values) if name == "models"
                            else _replace_section(name, current, values))
        return dataclasses.replace(self, **kwargs)

    def model_config(self, name: str) -> RAGConfig:
        """The config the model ``name`` of ``[models]`` answers with: ``[generate]``,
        ``[vllm]`` and ``[openai]`` with its table on top, and no ``[models]``."""
        spec = self.models.spec(name)
        if spec is None:
            raise ConfigError(f"models.{name}", f"no such model; configured: {', '.join(self.models.names)}")
        try:
            return dataclasses.replace(self, models=ModelsConfig()).replace(**spec.sections())
        except ConfigError as e:
            raise ConfigError(f"models.{name}.{e.field.removeprefix('generate.')}",
                              e.args[0].split(": ", 1)[-1]) from None

    def model_fingerprint(self, name: str) -> str:
        """The answer fingerprint of the named model: its config's, and its name (a result
        says which model answered, so two names never share an entry)."""
        return hashlib.sha256(f"{self.model_config(name).fingerprint()}:model={name}".encode()).hexdigest()

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



def serve_config(config: RAGConfig) -> RAGConfig:
    """A service has an L2 by default: with no Redis URL, an embedded Redis that keeps its
    data in ``$RAGSERVE_HOME/redis``, so answers survive a restart. ``ragserve serve`` and
    ``ragserve warm`` resolve their config through it, so both see the same L2."""
    c = config.cache
    if c.enabled and not c.redis_url:
        return config.replace(cache={"redis_url": "embedded", "redis_dir": c.redis_dir or str(data_home() / "redis")})
    return config


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
    _check_choice("generate.scheduling", cfg.generate.scheduling, Scheduling)
    for name in ("ivf_nlist", "ivf_nprobe", "hnsw_ef_search"):
        _check(getattr(i, name) >= 0, f"index.{name}", f"must be >= 0 (0 chooses), got {getattr(i, name)}")
    _check(0 <= i.shards <= 4096, "index.shards", f"must be in 0..4096 (0: not sharded), got {i.shards}")
    _check(2 <= i.hnsw_m <= 256, "index.hnsw_m", f"must be in 2..256, got {i.hnsw_m}")
    _check(i.hnsw_ef_construction >= 1, "index.hnsw_ef_construction",
           f"must be >= 1, got {i.hnsw_ef_construction}")
    _check(1 <= q.top_k <= 100, "query.top_k", f"must be in 1..100, got {q.top_k}")
    _check(e.batch_window_ms >= 0, "embed.batch_window_ms", f"must be >= 0, got {e.batch_window_ms}")
    _check(e.max_batch >= 1, "embed.max_batch", f"must be >= 1, got {e.max_batch}")
    _check(q.timeout_s >= 0, "query.timeout_s", f"must be >= 0 (0: no deadline), got {q.timeout_s}")
    _check(q.max_in_flight >= 1, "query.max_in_flight", f"must be >= 1, got {q.max_in_flight}")
    _check(q.max_queued >= 0, "query.max_queued", f"must be >= 0, got {q.max_queued}")
    _check(0 <= q.reserved_in_flight < q.max_in_flight, "query.reserved_in_flight",
           f"must be in 0..max_in_flight - 1 ({q.max_in_flight - 1}), got {q.reserved_in_flight}")
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
    validate_semantic(cfg.semantic)
    validate_telemetry(cfg.telemetry)
    validate_models(cfg.models)
    for name in cfg.models.names:
        cfg.model_config(name)  # each model's own settings, checked as [generate] is
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
    _check(not sv.admin_key or len(sv.admin_key) >= 16, "server.admin_key",
           f"must have 16+ characters (as API keys do), got {len(sv.admin_key)}")
    _check(sv.max_header_bytes >= 1024, "server.max_header_bytes", f"must be >= 1024, got {sv.max_header_bytes}")
    _check(sv.log_format in ("text", "json"), "server.log_format", f"must be 'text' or 'json', got {sv.log_format!r}")
    _check(sv.max_headers >= 8, "server.max_headers", f"must be >= 8, got {sv.max_headers}")
    for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s", "send_timeout_s"):
        _check(getattr(sv, name) > 0, f"server.{name}", f"must be > 0, got {getattr(sv, name)}")
    _check(sv.max_connections >= 2, "server.max_connections", f"must be >= 2, got {sv.max_connections}")
    _check(0 <= sv.ops_connections < sv.max_connections, "server.ops_connections",
           f"must be in 0..max_connections-1 ({sv.max_connections - 1}), got {sv.ops_connections}")
    _check(sv.mcp_max_sessions >= 1, "server.mcp_max_sessions", f"must be >= 1, got {sv.mcp_max_sessions}")
    _check(0 < sv.mcp_session_idle_s < float("inf"), "server.mcp_session_idle_s",
           f"must be a number of seconds > 0, got {sv.mcp_session_idle_s}")
    _check(k.redis_url in ("", "embedded") or k.redis_url.split("://")[0] in ("redis", "rediss", "unix"),
           "cache.redis_url", f"must be '', 'embedded' or a redis://, rediss:// or unix:// URL, got {k.redis_url!r}")


def _check_choice(where: str, value: str, choices: Any) -> None:
    allowed = get_args(choices)
    _check(value in allowed, where, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
