"""Config sections of the generator backends: ``[vllm]`` and ``[openai]``.

``[generate]`` (``GenerateConfig`` in ``generate.py``) keeps what every backend shares: the
model, the context length, the sampling. ``generate.backend`` picks the backend; the
options only one backend reads live in its own section here.

**Usage:**

    cfg = RAGConfig().replace(generate={"backend": "openai"},
                              openai={"urls": ["http://gpu-1:8000", "http://gpu-2:8000"]})

or ``RAGSERVE_GENERATE_BACKEND=openai RAGSERVE_OPENAI_URLS=http://gpu-1:8000,http://gpu-2:8000``.

Old configs: the vLLM options used to sit under ``[generate]``. They still load there
(TOML, ``RAGSERVE_GENERATE_KV_CACHE_GIB``-style env vars, ``replace(generate=...)``):
``migrate_legacy`` moves them to ``[vllm]`` with a ``FutureWarning`` that names the new
place. Setting one in both places to different values is a ``ConfigError``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ragserve.errors import ConfigError

Backend = Literal["vllm", "openai"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
TokenizerSource = Literal["", "server"]


@dataclass(frozen=True)
class VllmConfig:
    """``generate.backend = "vllm"``: vLLM's ``AsyncLLM`` in this process (the default).

    **Usage:** ``RAGConfig().replace(vllm={"kv_cache_gib": 4})`` or ``RAGSERVE_VLLM_KV_CACHE_GIB=4``.
    """

    dtype: DType = "bfloat16"
    """Weights dtype in vLLM; bfloat16 runs on AVX-512 CPUs and on GPUs."""
    enforce_eager: bool = True
    """Skip CUDA-graph/compile warm-up: starts far faster; set False on a GPU server."""
    gpu_memory_utilization: float = 0.85
    """Share of GPU memory vLLM may take (ignored on the CPU)."""
    kv_cache_gib: float = 2.0
    """KV-cache size on the CPU build (VLLM_CPU_KVCACHE_SPACE)."""
    uniproc_executor: bool = True
    """Run the model inside vLLM's engine-core process instead of a third, separate worker
    process (VLLM_ENABLE_V1_MULTIPROCESSING=0; AsyncLLM still keeps the engine core out of
    this process). On a 2-core machine the extra process competes for the cores: measured
    here, the engine started in 13 s instead of 34 s. Set False for multi-GPU serving."""
    max_num_seqs: int = 64
    """Most sequences vLLM batches in one step."""
    stream_interval: int = 1
    """Tokens per streamed piece (vLLM's ``--stream-interval``): 1 sends each token as it
    is generated; N sends every Nth, while the first token and the end still go out at
    once (time to first token does not move). It never changes an answer. Every piece
    wakes each layer it crosses (vLLM's output processor, the hop to the caller's loop, an
    SSE write, the client); raise it when token rates are high and the host, not the
    model, is the limit. On this project's 2-core CPU machine (about 300 tokens/s in all)
    1, 4 and 64 measured within run-to-run noise of each other (README, "Streaming")."""


@dataclass(frozen=True)
class OpenAIConfig:
    """``generate.backend = "openai"``: one or more OpenAI-compatible servers (vLLM's own
    ``python -m vllm.entrypoints.openai.api_server`` is the case it is built for), reached
    through ``POST /v1/completions``. None of it but ``model`` changes an answer.

    **Usage:** ``RAGConfig().replace(generate={"backend": "openai"}, openai={"urls": ["http://gpu-1:8000"]})``
    """

    urls: tuple[str, ...] = ()
    """Base URLs of the servers (``http://host:8000``; a trailing ``/v1`` is accepted). Each
    request goes to the one with the fewest requests outstanding. Env: comma-separated."""
    api_key: str = field(default="", repr=False)
    """Sent as ``Authorization: Bearer KEY`` to every server ("" sends none); vLLM's
    ``--api-key``."""
    model: str = ""
    """The served model name to ask for (vLLM's ``--served-model-name``); "" takes the first
    model the first reachable server lists at ``GET /v1/models``. Part of every cache key:
    with "" the key names ``generate.model`` only, so set it when servers may change model."""
    connect_timeout_s: float = 2.0
    """Longest wait to open a connection; a server that does not answer in time counts as
    a failure and the request goes to another one."""
    read_timeout_s: float = 120.0
    """Longest wait for the next bytes of a response: the first token (queue + prefill on a
    loaded server) and every token after it. Past it the request fails on that server; it
    moves to another only if no token came yet. Keep it above the servers' worst time to
    first token, or a busy server is taken for a dead one."""
    max_connections: int = 128
    """Connections kept to each server (HTTP/1.1: one per request in flight). Requests past
    it wait for a free one; ``query.max_in_flight`` bounds them first."""
    failures_to_eject: int = 3
    """Consecutive failures (connection refused or timed out, 5xx, a stream cut before its
    first token) after which a server gets no more requests until a probe finds it healthy."""
    probe_interval_s: float = 2.0
    """How often an ejected server is probed (``GET /health``, else ``GET /v1/models``)."""
    retries: int = 2
    """Other servers a request may try after one fails, only while nothing was generated."""
    tokenizer: TokenizerSource = ""
    """Where the token budget of the prompt is counted: "" loads the tokenizer of the local
    model folder ``generate.model`` names (as the vllm backend does; needs transformers
    and the folder, not the weights); "server" asks the servers' ``POST /tokenize`` and
    ``/detokenize`` (vLLM's server has both), for a model that exists only there."""


LEGACY_GENERATE_KEYS = ("dtype", "enforce_eager", "gpu_memory_utilization", "kv_cache_gib", "uniproc_executor",
                        "max_num_seqs")
"""``[generate]`` keys that moved to ``[vllm]``: the ones ``[vllm]`` had then. A field added
to ``[vllm]`` since was never a ``[generate]`` key, so it is not one of them."""


def migrate_legacy(sections: dict[str, Any]) -> dict[str, Any]:
    """Move vLLM options given under ``generate`` to ``vllm`` (a copy; the input is kept).

    Call it once per source (TOML file, env vars, a ``replace`` call), so that the env can
    still override the file with either spelling.
    """
    generate = sections.get("generate")
    if not isinstance(generate, dict):
        return sections
    moved = {k: generate[k] for k in LEGACY_GENERATE_KEYS if k in generate}
    if not moved:
        return sections
    vllm = sections.get("vllm")
    vllm = dict(vllm) if isinstance(vllm, dict) else {}
    for key, value in moved.items():
        if key in vllm and vllm[key] != value:
            raise ConfigError(f"generate.{key}", f"moved to vllm.{key}, which is set too, to another value "
                              f"({vllm[key]!r} against {value!r}); keep only [vllm] {key}")
        vllm[key] = value
    names = ", ".join(moved)
    warnings.warn(f"[generate] {names} moved to the [vllm] section (env RAGSERVE_VLLM_<FIELD>); "
                  "the old place still loads for now", FutureWarning, stacklevel=3)
    rest = {k: v for k, v in generate.items() if k not in moved}
    return {**sections, "generate": rest, "vllm": vllm}


def normalise_url(url: str) -> str:
    """``http://h:8000/v1/`` → ``http://h:8000``: the routes are added per call (``/v1/...``
    for the OpenAI API, ``/health``, ``/tokenize`` at the root as vLLM serves them)."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(where, message)


def validate_backends(backend: str, v: VllmConfig, o: OpenAIConfig) -> None:
    """The two sections' checks (``config._validate`` calls this)."""
    allowed = get_args(Backend)
    _check(backend in allowed, "generate.backend",
           f"must be one of {', '.join(map(repr, allowed))}, got {backend!r}")
    _check(v.kv_cache_gib > 0, "vllm.kv_cache_gib", f"must be > 0, got {v.kv_cache_gib}")
    _check(0 < v.gpu_memory_utilization <= 1, "vllm.gpu_memory_utilization",
           f"must be in (0, 1], got {v.gpu_memory_utilization}")
    _check(v.max_num_seqs >= 1, "vllm.max_num_seqs", f"must be >= 1, got {v.max_num_seqs}")
    _check(v.stream_interval >= 1, "vllm.stream_interval", f"must be >= 1, got {v.stream_interval}")
    _check(v.dtype in get_args(DType), "vllm.dtype",
           f"must be one of {', '.join(map(repr, get_args(DType)))}, got {v.dtype!r}")
    for url in o.urls:
        _check(url.startswith(("http://", "https://")), "openai.urls",
               f"each must be an http:// or https:// URL, got {url!r}")
    _check(len(set(map(normalise_url, o.urls))) == len(o.urls), "openai.urls", "lists a server twice")
    _check(backend != "openai" or bool(o.urls), "openai.urls",
           "the openai backend needs at least one server URL (RAGSERVE_OPENAI_URLS=http://host:8000,...)")
    for name in ("connect_timeout_s", "read_timeout_s", "probe_interval_s"):
        _check(getattr(o, name) > 0, f"openai.{name}", f"must be > 0, got {getattr(o, name)}")
    _check(o.max_connections >= 1, "openai.max_connections", f"must be >= 1, got {o.max_connections}")
    _check(o.failures_to_eject >= 1, "openai.failures_to_eject", f"must be >= 1, got {o.failures_to_eject}")
    _check(o.retries >= 0, "openai.retries", f"must be >= 0, got {o.retries}")
    _check(o.tokenizer in get_args(TokenizerSource), "openai.tokenizer",
           f"must be '' (the local folder of generate.model) or 'server' (POST /tokenize), "
           f"got {o.tokenizer!r}")
