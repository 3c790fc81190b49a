"""The Ray Serve application: the ingress deployment bound to the generator deployment(s).

With ``[models]``, one generator deployment per group of models (``generator_groups``):
the models that ``ragserve serve`` would run on one vLLM engine (same model folder and
engine settings, only sampling differs) share one deployment, and each ``openai`` model
has its own (a pooled client of its servers, as the one model's deployment is without
``[models]``). The group of the default model is ``RagserveGenerator``; the others are
``RagserveGenerator-NAME`` after their first model. Each has the ``[ray] generator_*``
replicas and bounds. The ingress gets a handle per model.

Two ways in, one builder:

- ``ragserve serve INDEX --ray`` (``run.py``) calls ``application(index, config)``.
- A Serve config file, e.g. KubeRay's ``RayService`` ``serveConfigV2``, names
  ``import_path: ragserve.ray.serve.app:build_app`` with ``args``: Serve calls
  ``build_app(args)`` on the cluster. ``args``: ``index`` (required), ``config`` (a TOML
  file on the cluster), and any sections to override, as in ``RAGConfig.replace``::

      args:
        index: /data/indexes/docs
        cache: {redis_url: "redis://redis:6379/0"}
        ray: {replicas: 2}

The config is resolved once, here (defaults, then the TOML file, then the ``RAGSERVE_*``
env of the process that builds the application, then ``args``), and handed to every
replica as a dict: all replicas serve the same config whatever their node's env says.
NOTE: that dict includes keys (``openai.api_key``, ``server.admin_key``) and is kept by
Serve's controller; prefer ``server.api_keys_file`` paths and mounted secrets.

**Usage:** ``serve.run(application("indexes/docs", RAGConfig.load()), name="ragserve")``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ragserve.errors import ConfigError

INGRESS = "RagserveIngress"
GENERATOR = "RagserveGenerator"
SHARDS = "RagserveShards"


def build_app(args: dict[str, Any]) -> Any:
    """Serve's application builder (``import_path: ragserve.ray.serve.app:build_app``)."""
    from ragserve.config import RAGConfig

    args = dict(args or {})
    index = args.pop("index", None)
    if not index:
        raise ConfigError("args.index",
                          "the Serve application needs `index: /path/to/indexes/NAME` in its args")
    path = args.pop("config", None)
    config = RAGConfig.load(path)
    if args:
        config = config.replace(**args)
    return application(index, config)


def ingress_options(config: Any) -> dict[str, Any]:
    """``serve.deployment`` options of the ingress, from ``[ray]``: replicas or autoscaling,
    CPUs, Serve's request bounds, and its refusals as 429 + ``Retry-After``."""
    from ray.serve.config import BackpressureConfig

    r = config.ray
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": r.num_cpus},
        "max_ongoing_requests": r.max_ongoing_requests,
        "max_queued_requests": r.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=config.server.retry_after_s),
        # NOTE: Serve drains a stopping replica for this long before __del__ closes it: the
        # same grace as the single-process server's SIGTERM drain.
        "graceful_shutdown_timeout_s": config.server.drain_grace_s,
    }
    if r.max_replicas:
        options["autoscaling_config"] = {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                                         "initial_replicas": r.replicas,
                                         "target_ongoing_requests": r.target_ongoing_requests}
    else:
        options["num_replicas"] = r.replicas
    return options


def generator_options(config: Any) -> dict[str, Any]:
    """``serve.deployment`` options of the generator, from ``[ray]``."""
    r = config.ray
    return {
        "num_replicas": r.generator_replicas,
        "ray_actor_options": {"num_cpus": r.generator_num_cpus, "num_gpus": r.generator_num_gpus},
        "max_ongoing_requests": r.generator_max_ongoing_requests,
        "max_queued_requests": r.generator_max_queued_requests,
        "graceful_shutdown_timeout_s": config.server.drain_grace_s,
    }


def generator_groups(config: Any) -> list[tuple[str, tuple[str, ...]]]:
    """``(deployment name, models it serves)`` per generator deployment, the default
    model's first. Without ``[models]``: ``[("RagserveGenerator", ())]``, the one
    ``[generate]`` model. vLLM models are grouped by what their engine is made of
    (``generators.vllm.engine_key``: the model's folder where this driver can resolve it,
    context length, scheduling, ``[vllm]``); an ``openai`` model is a group of its own."""
    from ragserve.generators.vllm import engine_key

    m = config.models
    if not m.names:
        return [(GENERATOR, ())]
    groups: dict[Any, list[str]] = {}
    for name in sorted(m.names, key=lambda n: n != m.default_name):  # the default's group first
        c = config.model_config(name)
        key: Any = (engine_key(_model_folder(c.generate.model), c.generate, c.vllm)
                    if c.generate.backend == "vllm" else ("openai", name))
        groups.setdefault(key, []).append(name)
    named = list(groups.values())
    return [(GENERATOR if i == 0 else f"{GENERATOR}-{names[0]}", tuple(names)) for i, names in enumerate(named)]


def _model_folder(spec: str) -> str:
    """The folder a vLLM model's spec names, as ``VllmGenerator`` resolves it ("default", a
    relative path), so that two specs of one folder share a deployment as they share an
    engine in ``ragserve serve``; the spec itself when the folder is only on the nodes."""
    from ragserve.errors import RagserveError
    from ragserve.models.resolve import resolve_generation_model

    try:
        return str(resolve_generation_model(spec))
    except (RagserveError, OSError):
        return spec


def application(index: str | Path, config: Any, *, generator: Any = None) -> Any:
    """The application, not yet running (``serve.run`` starts it). ``generator``: an object
    the (default model's) generator deployment serves instead of the configured backend
    (tests). A sharded index adds the shard supervisor (``shards.py``), whose actors hold
    the shards. With ``[models]``, a generator deployment per group (module docstring)."""
    from ray import serve

    from ragserve.ray.serve.generator import GeneratorServer
    from ragserve.ray.serve.ingress import IngressServer, require_shared_l2

    require_shared_l2(config)
    settings = config.to_dict()
    handles: Any = None
    for i, (name, models) in enumerate(generator_groups(config)):
        gen = serve.deployment(GeneratorServer, name=name, **generator_options(config))
        bound = gen.bind(settings, generator if i == 0 else None, models)
        if not models:
            handles = bound
        else:  # Serve hands the ingress a handle wherever a bound deployment is in its args
            handles = {**(handles or {}), **{model: bound for model in models}}
    ingress = serve.deployment(serve.ingress()(IngressServer), name=INGRESS, **ingress_options(config))
    path = str(Path(index).absolute())
    if not is_sharded_index(path):
        return ingress.bind(path, settings, handles)
    from ragserve.ray.serve.shards import ShardSupervisor

    # NOTE: the supervisor only owns the shard actors (they reserve ray.shard_num_cpus each);
    # it searches nothing, so it reserves no CPU of its own.
    supervisor = serve.deployment(ShardSupervisor, name=SHARDS, num_replicas=1,
                                  ray_actor_options={"num_cpus": 0})
    return ingress.bind(path, settings, handles, supervisor.bind(settings))


def is_sharded_index(index: str | Path) -> bool:
    """Whether ``index`` (a path, maybe a versioned link) holds a sharded index; a folder
    that is not an index yet is left to the ingress replicas to refuse."""
    from ragserve.index.manifest import read_manifest
    from ragserve.index.shards import is_sharded

    try:
        return is_sharded(read_manifest(index).data)
    except Exception:  # noqa: BLE001 - the replicas open it and raise the typed error
        return False
