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
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger("ragserve.server")


def serve_on_ray(index: str | Path, config: Any, *, ready_file: Path | None = None,
                 printer: Any = None) -> None:
    """Deploy ``index`` as a Serve application and serve it until SIGTERM or Ctrl-C.

    ``ready_file``: the port is written there once every replica is up (tests);
    ``printer``: a function given one line to show the user (default: the log).
    """
    import ray
    from ray import serve

    from ragserve.ray.serve import proxy
    from ragserve.ray.serve.app import application
    from ragserve.ray.serve.ingress import require_shared_l2

    say = printer or log.warning
    require_shared_l2(config)  # before minutes of cluster and engine start-up
    r, s = config.ray, config.server
    started = False
    if not ray.is_initialized():
        started = _connect(r)
    stop = _stop_on_signals()
    try:
        port = s.port or _free_port()
        env = {proxy.ENV: proxy.CALLBACK, proxy.RETRY_AFTER_ENV: str(s.retry_after_s)}
        serve.start(http_options={"host": s.host, "port": port},
                    controller_options={"runtime_env": {"env_vars": env}})
        host, port = _proxy_address(s.host, port)
        say(f"deploying {index} as Serve application {r.app_name!r} "
            f"({_replicas(r)} ingress replica(s), {r.generator_replicas} generator replica(s)); "
            "waiting for every replica to be up")
        serve.run(application(index, config), name=r.app_name, route_prefix="/",
                  logging_config={"enable_access_log": False})
        url = f"http://{host}:{port}"
        say(f"serving {index} on {url} (Ray Serve application {r.app_name!r}); SIGTERM or Ctrl-C stops it")
        if ready_file is not None:
            ready_file.write_text(str(port))
        stop.deployed = True
        while not stop.wait(1.0):
            pass
        say(f"stopping: deleting application {r.app_name!r} (requests in flight get up to "
            f"{s.drain_grace_s:g} s)")
    finally:
        try:
            serve.delete(r.app_name)
        finally:
            if started:
                serve.shutdown()
                ray.shutdown()
    log.info("ragserve (Ray) stopped")


def _connect(r: Any) -> bool:
    """``ray.init`` for ``ray.address``; True when it started a local cluster."""
    import ray

    address = r.address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {}
    if address == "local":
        # NOTE: no dashboard: on a small machine its processes compete with the replicas.
        kwargs = {"include_dashboard": False, **({"num_cpus": r.local_num_cpus} if r.local_num_cpus else {})}
    elif address != "auto":
        _token_auth_if_available()
    ray.init(address=address, **kwargs)
    return address == "local"


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
    deployed = False


def _stop_on_signals() -> _Stop:
    """SIGTERM and SIGINT: while deploying, stop at once (``KeyboardInterrupt``; the
    application is deleted on the way out); once serving, ask for a drain; a second
    signal during the drain stops waiting for it."""
    stop = _Stop()

    def handle(sig: int, frame: FrameType | None) -> None:
        if not stop.deployed or stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
    return stop


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
