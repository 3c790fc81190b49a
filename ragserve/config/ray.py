"""The ``[ray]`` config section: ``ragserve serve --ray`` on a Ray cluster.

None of it changes an answer (it is not in the fingerprint): it says where the cluster is,
how many replicas of each deployment run, what each one reserves, and Ray Serve's
request bounds. Where the HTTP proxy listens stays in ``[server]`` (``host``, ``port``:
the same ``--host`` / ``--port`` as ``ragserve serve``).

**Usage:**

    cfg = RAGConfig().replace(ray={"address": "auto", "replicas": 2})

or ``RAGSERVE_RAY_ADDRESS=auto RAGSERVE_RAY_REPLICAS=2``, or a ``[ray]`` table in the TOML.
"""

from __future__ import annotations

from dataclasses import dataclass

from ragserve.errors import ConfigError


@dataclass(frozen=True)
class RayConfig:
    """``ragserve serve --ray``: an ingress deployment (the HTTP app, N replicas) and a
    generator deployment (the model), as one Ray Serve application."""

    address: str = ""
    """The cluster to run on: "" starts a local one for this process (unless ``RAY_ADDRESS``
    is set: then that one); "auto" joins the cluster ``ray start`` runs on this machine;
    or a ``host:6379`` / ``ray://host:10001`` address. ``build-index --ray`` and ``batch
    --ray`` run there too, unless their ``--ray-address`` says otherwise."""
    local_num_cpus: int = 0
    """CPUs a local cluster (``address = ""``) may schedule; 0: all of this machine's."""
    app_name: str = "ragserve"
    """The Serve application's name (one cluster can run several)."""
    replicas: int = 1
    """Ingress replicas: each holds the embedding model, the memory-mapped index and its
    own L1; all share the L2 Redis and the generator deployment."""
    min_replicas: int = 1
    """With ``max_replicas`` > 0: the autoscaler's lower bound (``replicas`` is then where it
    starts)."""
    max_replicas: int = 0
    """0: a fixed ``replicas``. Above 0: Serve autoscales the ingress between
    ``min_replicas`` and this on ``target_ongoing_requests``."""
    target_ongoing_requests: float = 32.0
    """Autoscaling: the requests in flight per ingress replica the autoscaler aims at."""
    num_cpus: float = 1.0
    """CPUs each ingress replica reserves (Ray also sets its ``OMP_NUM_THREADS`` from it)."""
    max_ongoing_requests: int = 64
    """Requests one ingress replica takes at once (Serve's ``max_ongoing_requests``; its
    own default of 5 would starve vLLM's batch). Keep it near ``query.max_in_flight``."""
    max_queued_requests: int = 256
    """Requests Serve's proxy holds for the ingress while every replica is at
    ``max_ongoing_requests``; past it a request gets 429 with ``Retry-After`` at once
    (``server.retry_after_s``). -1: no bound (not advised: the queue can grow without end).
    NOTE: Serve counts a request from its arrival until a replica takes it, so a burst that
    arrives at one instant can be refused below ``replicas * max_ongoing_requests`` + this:
    keep it well above the bursts to absorb."""
    generator_replicas: int = 1
    """Generator replicas: one engine each (one per GPU on a GPU cluster; 1 on a CPU)."""
    generator_num_cpus: float = 1.0
    """CPUs each generator replica reserves. Ray sets the replica's ``OMP_NUM_THREADS`` from
    it, so with vLLM on a CPU node give it the cores the engine should use (and declare them
    to Ray); on a GPU node 1 is enough."""
    generator_num_gpus: float = 0.0
    """GPUs each generator replica reserves (1 on a GPU cluster; 0 on the CPU build)."""
    generator_max_ongoing_requests: int = 256
    """Requests one generator replica takes at once; vLLM batches them continuously, so
    keep it above ``vllm.max_num_seqs``."""
    generator_max_queued_requests: int = -1
    """Requests each ingress replica holds for the generator while it is full; past it the
    request fails with OverloadedError (429). -1: no bound (the ingress bounds come first)."""
    probe_interval_s: float = 2.0
    """How often each ingress replica asks the generator deployment whether it is alive and
    for its stats (``/health``, ``/v1/stats``)."""
    shard_replicas: int = 1
    """A sharded index (``build-index --shards N``): copies of each shard actor. Each copy
    holds its shards in memory; a search goes to one copy of every shard, and to another
    copy when that one fails. With 2 or more a killed shard actor fails no request; with 1
    a request that finds a shard down gets a 503 (``ShardUnavailableError``), never the
    other shards' top-k presented as whole (unless ``allow_partial``: then marked partial)."""
    allow_partial: bool = False
    """With a shard that has no answering copy (``shard_replicas`` = 1 and its actor down):
    answer from the shards that answered instead of a 503, and mark the answer as partial
    (``QueryResult.missing_shards``; ``X-Partial-Shards``). A partial answer is never
    cached. Off: such a request gets ``ShardUnavailableError`` (503 with ``Retry-After``).
    A request that no shard answers is a 503 either way."""
    shards_per_actor: int = 1
    """Shards one shard actor holds (and searches one after the other): N shards make
    ceil(N / this) actor groups of ``shard_replicas`` actors each."""
    shard_num_cpus: float = 0.25
    """CPUs each shard actor reserves (a flat fp16 search of one query is one thread's
    work; raise it on a cluster whose shards are large)."""
    shard_timeout_s: float = 10.0
    """How long an ingress waits for one shard actor's answer before it tries another copy
    (or counts the shard as missing)."""
    follow_index_s: float = 5.0
    """How often each ingress replica looks whether the index path names a new version (a
    build flipped it) and then reloads it, as ``POST /admin/reload`` does. Behind Serve's
    proxy that request reaches one replica only; this brings every replica to the new
    version within this many seconds. 0: off (reload only through the admin route)."""


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(where, message)


def validate_ray(r: RayConfig) -> None:
    """The section's checks (``config._validate`` calls this)."""
    _check(r.local_num_cpus >= 0, "ray.local_num_cpus", f"must be >= 0 (0: all), got {r.local_num_cpus}")
    _check(bool(r.app_name.strip()), "ray.app_name", "must not be empty")
    _check(r.replicas >= 1, "ray.replicas", f"must be >= 1, got {r.replicas}")
    _check(r.max_replicas >= 0, "ray.max_replicas", f"must be >= 0 (0: no autoscaling), got {r.max_replicas}")
    if r.max_replicas:
        _check(0 <= r.min_replicas <= r.max_replicas, "ray.min_replicas",
               f"must be in 0..max_replicas ({r.max_replicas}), got {r.min_replicas}")
        _check(r.min_replicas <= r.replicas <= r.max_replicas, "ray.replicas",
               f"with autoscaling it is where Serve starts: must be in min_replicas..max_replicas "
               f"({r.min_replicas}..{r.max_replicas}), got {r.replicas}")
    _check(r.target_ongoing_requests > 0, "ray.target_ongoing_requests",
           f"must be > 0, got {r.target_ongoing_requests}")
    for name in ("num_cpus", "generator_num_cpus", "generator_num_gpus"):
        _check(getattr(r, name) >= 0, f"ray.{name}", f"must be >= 0, got {getattr(r, name)}")
    for name in ("max_ongoing_requests", "generator_max_ongoing_requests", "generator_replicas"):
        _check(getattr(r, name) >= 1, f"ray.{name}", f"must be >= 1, got {getattr(r, name)}")
    for name in ("max_queued_requests", "generator_max_queued_requests"):
        value = getattr(r, name)
        _check(value == -1 or value >= 1, f"ray.{name}", f"must be -1 (no bound) or >= 1, got {value}")
    _check(r.probe_interval_s > 0, "ray.probe_interval_s", f"must be > 0, got {r.probe_interval_s}")
    for name in ("shard_replicas", "shards_per_actor"):
        _check(getattr(r, name) >= 1, f"ray.{name}", f"must be >= 1, got {getattr(r, name)}")
    _check(isinstance(r.allow_partial, bool), "ray.allow_partial",
           f"must be true or false, got {r.allow_partial!r}")
    _check(r.shard_num_cpus >= 0, "ray.shard_num_cpus", f"must be >= 0, got {r.shard_num_cpus}")
    _check(r.shard_timeout_s > 0, "ray.shard_timeout_s", f"must be > 0, got {r.shard_timeout_s}")
    _check(r.follow_index_s >= 0, "ray.follow_index_s", f"must be >= 0 (0: off), got {r.follow_index_s}")
