"""Connecting to a Ray cluster for ragserve's Ray paths (``build-index --ray``).

``import_ray`` imports ray where it is needed, with the install hint when it is missing;
``ray_session(address)`` connects, says what it connected to, and disconnects after:

- ``None`` (the default): this process's own connection if it has one (a test's cluster,
  a notebook's), else ``RAY_ADDRESS``, else the cluster ``ray start --head`` started on
  this machine, else a local cluster started for this run and stopped after it.
- ``"local"``: always a new local cluster for this run, stopped after it.
- ``"auto"``: Ray's lookup of a running cluster (also one another process started on this
  machine); an error if there is none.
- ``"HOST:PORT"`` (a head's GCS address) or ``"ray://HOST:PORT"`` (Ray Client): that one.

NOTE: an explicit address is probed with a plain TCP connect first: given an address where
nothing listens, ``ray.init`` retries for well over a minute before it fails.

**Usage:** ``with ray_session(None, num_cpus=2) as info: print(info.address, info.cpus)``
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ragserve.errors import ClusterError, ConfigError
from ragserve.ray.reaper import LocalClusterReaper, pythonpath

INSTALL_HINT = "`pip install ragserve[ray]`"
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ClusterInfo:
    address: str
    """The GCS address of the cluster in use."""
    how: str
    """"this process's connection", "connected" or "started locally"."""
    nodes: int
    cpus: float
    seconds: float
    """Time to connect, or to start the local cluster (Ray's own start-up overhead)."""


def import_ray() -> ModuleType:
    """``ray``, or a ClusterError naming the extra that installs it."""
    try:
        import ray
    except ImportError as e:
        raise ClusterError(f"ray is not installed ({e}); install it with {INSTALL_HINT}") from None
    return ray


def cluster_target(address: str | None, num_cpus: int | None, ray_config: Any) -> tuple[str | None, int | None]:
    """``(address, num_cpus)`` for ``ray_session``: the caller's (``--ray-address``) win
    over the config's ``[ray]`` section (``address``, ``local_num_cpus``); "" and 0 in both
    leave the choice to ``ray_session`` (``RAY_ADDRESS``, ``ray start`` here, ...)."""
    return address or ray_config.address or None, num_cpus or ray_config.local_num_cpus or None


def refuse_unshared_l2(config: Any, command: str, who: str, *, l2_required: bool) -> None:
    """Refuse an L2 that the processes of a Ray run (replicas, actors) would not share:
    an embedded Redis is one per process, so an answer cached by one is a miss on all the
    others. ``who``: what those processes are ("replica", "actor"). ``l2_required``: no
    Redis URL at all is refused too (``serve --ray``: a service has an L2); otherwise it
    means no L2 (``batch --ray``)."""
    c = config.cache
    if not c.enabled:
        return
    if c.redis_url == "embedded" or (l2_required and not c.redis_url):
        off = ("To serve without any answer cache, set cache.enabled = false" if l2_required
               else "Or leave cache.redis_url empty for no L2")
        raise ConfigError("cache.redis_url",
                          f"{command} needs a Redis that every {who} can reach, e.g. --redis-url "
                          "redis://cache-host:6379/0 (or RAGSERVE_REDIS_URL): an embedded Redis would be one "
                          f"per {who}, sharing no answers. {off}")
    if c.redis_url.startswith("unix://"):
        logging.getLogger("ragserve").warning("cache.redis_url is a unix socket: only this machine's processes "
                                              "can reach it")


@contextmanager
def quiet_ray_data(wait_for_actors_s: float, console_level: int = logging.CRITICAL + 1,
                   **settings: Any) -> Iterator[ModuleType]:
    """``ray.data`` set up for one run and put back after: no progress bars or start banner
    (the caller reports progress itself), ``wait_for_actors_s`` as the bound on starting the
    actors, any other ``DataContext`` ``settings``, and its console log at ``console_level``
    (muted by default; its file log, under the Ray session's ``logs/ray-data``, keeps
    everything)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    wanted = {"enable_progress_bars": False, "print_on_execution_start": False,
              "wait_for_min_actors_s": int(wait_for_actors_s), **settings}
    saved = {k: getattr(ctx, k) for k in wanted}
    console = [h for h in logging.getLogger("ray.data").handlers
               if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in console]
    for k, v in wanted.items():
        setattr(ctx, k, v)
    for h in console:
        h.setLevel(console_level)
    try:
        yield ray.data
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        for h, level in zip(console, levels):
            h.setLevel(level)


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[ClusterInfo]:
    """Connect (see the module docstring for ``address``), yield what was connected to, and
    disconnect at the end, stopping the cluster only if this call started it.
    ``num_cpus`` sizes a cluster started here (default: every CPU of the machine)."""
    ray = import_ray()
    t = time.perf_counter()
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address not in (None, "auto", current):
            raise ClusterError(f"this process is already connected to the Ray cluster at {current}, "
                               f"not {address}")
        yield _info(ray, "this process's connection", 0.0)
        return
    how, reaper = _connect(ray, address, num_cpus)
    try:
        yield _info(ray, how, time.perf_counter() - t)
    finally:
        try:
            ray.shutdown()
        finally:
            if reaper is not None:
                reaper.done()


@contextmanager
def group_signals_held() -> Iterator[None]:
    """Start a local cluster inside this block: the processes Ray starts (GCS, raylet,
    agents, monitors) then hold SIGTERM and SIGHUP blocked, as Ray itself holds SIGINT
    blocked in them. A stop signal sent to the whole process group (``kill -- -PGID``,
    systemd's ``KillMode=control-group``) then reaches only this process, which stops the
    application and then the cluster in order. Without it the GCS died with the signal,
    the graceful teardown waited 60 s for it and the command exited 1, leaving replicas.

    A blocked mask is inherited across fork and exec; this thread's own mask is put back
    at the end, so its signal handlers run as before. ``ray.shutdown`` ends those
    processes with SIGTERM, then SIGKILL after a second."""
    held = {signal.SIGTERM, signal.SIGHUP}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def start_local(ray: ModuleType, **kwargs: Any) -> LocalClusterReaper:
    """``ray.init(address="local", **kwargs)``, with the cluster's processes holding group
    signals (``group_signals_held``) and bound to this process by a reaper (``reaper.py``):
    call its ``done()`` after ``ray.shutdown()``."""
    reaper = LocalClusterReaper.start(tag=str(Path(ray.__file__).resolve().parent))
    try:
        with group_signals_held(), reaper.marking():
            ray.init(address="local", **kwargs)
    except BaseException:
        reaper.done()
        raise
    return reaper


def _connect(ray: ModuleType, address: str | None, num_cpus: int | None) -> tuple[str, LocalClusterReaper | None]:
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or _started_by_ray_start()
    if address in (None, "local"):
        reaper = start_local(ray, num_cpus=num_cpus, include_dashboard=False, runtime_env=_this_ragserve(), **quiet)
        return "started locally", reaper
    if address != "auto":
        probe(address)
    try:
        ray.init(address=address, **quiet)
    except ConnectionError as e:
        raise ClusterError(f"no Ray cluster at {address}: {e}") from None
    except ValueError as e:
        raise ClusterError(f"--ray-address or ray.address {address!r}: {e} (give HOST:PORT, "
                           "ray://HOST:PORT, auto or local)") from None
    return "connected", None


def _started_by_ray_start() -> str | None:
    """The address of the cluster the last ``ray start`` on this machine started, if any:
    what ``ray.init()`` itself connects to. NOTE: not ``address="auto"``, which also takes
    any other process's private local cluster it finds (a test session's, a notebook's)."""
    try:
        from ray._private.services import find_bootstrap_address  # Ray's own lookup; private
    except ImportError:
        return None
    return find_bootstrap_address(None)


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ClusterError unless something accepts TCP connections at ``address``
    (``HOST:PORT`` or ``ray://HOST:PORT``)."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"--ray-address or ray.address {address!r} is not HOST:PORT, ray://HOST:PORT, "
                           "auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({reason}); start one there with "
                           "`ray start --head`, or leave --ray-address and ray.address out to start a "
                           "local one") from None


def _this_ragserve() -> dict[str, dict[str, str]]:
    """A local cluster's workers import the ragserve this process runs, also when it is
    on ``sys.path`` by hand (a script's checkout) rather than installed."""
    return {"env_vars": {"PYTHONPATH": pythonpath()}}


def _info(ray: ModuleType, how: str, seconds: float) -> ClusterInfo:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterInfo(ray.get_runtime_context().gcs_address, how, len(nodes),
                       float(ray.cluster_resources().get("CPU", 0)), round(seconds, 3))
