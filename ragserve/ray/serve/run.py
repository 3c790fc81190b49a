"""``ragserve serve INDEX --ray``: deploy the application on a Ray cluster, wait, take it down.

1. Join the cluster ``ray.address`` names (``ray start --head`` on one machine, ``ray start
   --address HEAD:6379`` on the others), or start a local one for this process.
2. Start Serve's HTTP proxies on ``server.host``:``server.port`` (one per node), with
   ``proxy.py``'s middleware, unless Serve already runs on the cluster: then its proxies
   and their port are kept, and the port they use is the one printed.
3. ``serve.run`` the application (``app.py``) and wait until every replica is up (the
   generator's engine warm, every ingress replica's index verified and model loaded).
4. On SIGTERM or Ctrl-C: delete the application (Serve drains each replica for
   ``server.drain_grace_s``, then stops it); a cluster started here is shut down too.

A stop by SIGTERM or SIGINT is graceful whenever it comes: during the deployment (the
replicas are taken down at once), while serving (a drain), or a second one during the
drain (which stops waiting for it). Each ends the same way, with the application deleted
and a cluster started here shut down, and returns normally, so the command exits 0 and a
supervisor (systemd, Kubernetes) sees a clean stop. Signals that arrive during that
teardown are noted and ignored: it runs to its end.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from ragserve.ray.reaper import LocalClusterReaper

log = logging.getLogger("ragserve.server")


def serve_on_ray(index: str | Path, config: Any, *, ready_file: Path | None = None,
                 printer: Any = None) -> None:
    """Deploy ``index`` as a Serve application and serve it until SIGTERM or Ctrl-C.

    ``ready_file``: the port is written there once every replica is up (tests);
    ``printer``: a function given one line to show the user (default: the log).
    """
    import ray
    from ray import serve

    from ragserve.ray.serve.ingress import require_shared_l2

    say = printer or log.warning
    require_shared_l2(config)  # before minutes of cluster and engine start-up
    r = config.ray
    started, reaper = False, None
    if not ray.is_initialized():
        started, reaper = _connect(r)
    stop = _Stop()
    try:
        _stop_on_signals(stop)
        _deploy_and_serve(index, config, stop, ready_file, say)
    except _Interrupted as e:
        say(f"{e}: taking the application {r.app_name!r} down")
    finally:
        stop.phase = "draining"
        try:
            try:
                _quietly(serve.delete, r.app_name)
            finally:
                stop.phase = "closing"
        except _Interrupted:  # a second signal during the drain: stop waiting for it
            say("stopping without waiting for the drain")
            _quietly(serve.delete, r.app_name, _blocking=False)
        try:
            if started:
                _quietly(serve.shutdown)
                ray.shutdown()
        finally:
            if reaper is not None:
                reaper.done()
    log.info("ragserve (Ray) stopped")


def _quietly(step: Any, *args: Any, **kwargs: Any) -> None:
    """A teardown step that must not stop the rest: Serve may never have started (a stop
    while connecting), or a signal sent to the whole process group may have ended the local
    cluster's processes already."""
    try:
        step(*args, **kwargs)
    except Exception as e:
        name = getattr(step, "__name__", step)
        log.warning("stopping: %s failed (%s: %s); going on", name, type(e).__name__, e)


def _deploy_and_serve(index: str | Path, config: Any, stop: _Stop, ready_file: Path | None, say: Any) -> None:
    """Steps 2 and 3 of the module docstring, then wait for a stop signal."""
    from ray import serve

    from ragserve.ray.serve import proxy
    from ragserve.ray.serve.app import application, generator_groups

    r, s = config.ray, config.server
    port = s.port or _free_port()
    env = {proxy.ENV: proxy.CALLBACK, proxy.RETRY_AFTER_ENV: str(s.retry_after_s)}
    serve.start(http_options={"host": s.host, "port": port},
                controller_options={"runtime_env": {"env_vars": env}})
    host, port = _proxy_address(s.host, port)
    groups = generator_groups(config)
    models = f" for {len(config.models.names)} models" if config.models.names else ""
    say(f"deploying {index} as Serve application {r.app_name!r} "
        f"({_replicas(r)} ingress replica(s), {len(groups)} generator deployment(s){models} x "
        f"{r.generator_replicas} replica(s)); waiting for every replica to be up")
    serve.run(application(index, config), name=r.app_name, route_prefix="/",
              logging_config={"enable_access_log": False})
    url = f"http://{host}:{port}"
    say(f"serving {index} on {url} (Ray Serve application {r.app_name!r}); SIGTERM or Ctrl-C stops it")
    if ready_file is not None:
        ready_file.write_text(str(port))
    stop.phase = "serving"
    while not stop.wait(1.0):
        pass
    say(f"stopping: deleting application {r.app_name!r} (requests in flight get up to "
        f"{s.drain_grace_s:g} s)")


def _connect(r: Any) -> tuple[bool, LocalClusterReaper | None]:
    """``ray.init`` for ``ray.address``; whether it started a local cluster, and that
    cluster's reaper (``ragserve/ray/reaper.py``)."""
    import ray

    address = r.address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {}
    if address == "local":
        # NOTE: no dashboard: on a small machine its processes compete with the replicas.
        kwargs = {"include_dashboard": False, **({"num_cpus": r.local_num_cpus} if r.local_num_cpus else {})}
    elif address != "auto":
        _token_auth_if_available()
    if address == "local":
        from ragserve.ray.cluster import start_local

        # a signal to the whole group stops the cluster in order, after the app; a SIGKILL reaps it
        return True, start_local(ray, **kwargs)
    ray.init(address=address, **kwargs)
    return False, None


def _token_auth_if_available() -> None:
    """NOTE: Ray 2.60 turns token authentication on for the clusters ``ray start`` starts,
    and ``ray.init`` sends the token by itself for "auto" only, not for an explicit address.
    Send it, as ``ray start --address`` does, when a token is at hand (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; ``RAY_AUTH_MODE`` set decides instead)."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


class _Stop(threading.Event):
    phase = "deploying"
    """deploying → serving → draining (``serve.delete``) → closing (the cluster's shutdown)."""


class _Interrupted(BaseException):
    """A stop signal that ends what the main thread waits on (the deployment, or the drain).
    Not ``KeyboardInterrupt``: a stop asked for is not a failure, and the command exits 0
    once the teardown is done. A ``BaseException``, as ``KeyboardInterrupt`` is, so that no
    ``except Exception`` in the libraries it passes through takes it for their own error."""


def _stop_on_signals(stop: _Stop) -> None:
    """SIGTERM and SIGINT: while deploying, stop at once (``_Interrupted``; the application
    is deleted on the way out); once serving, ask for a drain; during the drain, stop
    waiting for it; while closing, nothing (the teardown finishes)."""

    def handle(sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if stop.phase == "serving":
            stop.set()
        elif stop.phase == "deploying":
            raise _Interrupted(f"{name} while deploying")
        elif stop.phase == "draining":
            stop.phase = "closing"
            raise _Interrupted(name)
        else:
            log.warning("%s while closing: the teardown finishes first", name)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


def _proxy_address(host: str, port: int) -> tuple[str, int]:
    """Where Serve's proxies listen: what was asked, unless Serve already ran on the
    cluster with other HTTP options (then those stay, and are what we print)."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
    except Exception as e:  # noqa: BLE001 - a private API: fall back to what was asked
        log.debug("cannot read Serve's HTTP options: %s", e)
        return host, port
    if (http.host, http.port) != (host, port):
        log.warning("Serve already runs on this cluster with its proxies on %s:%d (not %s:%d): kept",
                    http.host, http.port, host, port)
    return http.host or host, http.port


def _replicas(r: Any) -> str:
    return f"{r.min_replicas}..{r.max_replicas}" if r.max_replicas else str(r.replicas)


def _free_port() -> int:
    from ragserve.cache.redis_server import free_port

    return free_port()
