"""Run the HTTP service: open the index, warm the engine, serve, drain on SIGTERM.

Shutdown, as load balancers and Kubernetes expect it:

1. SIGTERM (or Ctrl-C): ``/ready`` and ``/health`` answer 503 and new requests get 503,
   so the balancer stops routing here; requests in flight go on.
2. When the last of them is done, or ``server.drain_grace_s`` has passed, uvicorn stops;
   what is still running then is cancelled (its vLLM requests aborted, nothing cached).
3. The engine stops and pending cache writes are flushed; the process exits 0.

A second SIGTERM during the drain aborts what is left at once. SIGHUP reloads the index
(``RAG.reload``: the path is opened again, verified and swapped in; a bad index is refused
and the current one keeps serving), as ``POST /admin/reload`` does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from ragserve.config import LOOPBACK_HOSTS, RAGConfig, serve_config
from ragserve.server.limits import uvicorn_options
from ragserve.server.middleware import ServingState

log = logging.getLogger("ragserve.server")


def serve_index(index: str | Path, config: RAGConfig, *, ready_file: Path | None = None,
                embedder: Any = None, generator: Any = None) -> None:
    """Serve ``index`` until SIGTERM. ``ready_file``: written once the port accepts (tests).
    ``embedder`` / ``generator``: as for ``RAG.from_index`` (default: the configured models;
    ``scripts/fake_serve.py`` passes stand-ins to study the HTTP layer without vLLM)."""
    from ragserve.rag import RAG
    from ragserve.server.app import create_app
    from ragserve.server.auth import ApiKeys, load_admin_key

    config = serve_config(config)
    s = config.server
    keys = ApiKeys.load(s.api_keys_file) if s.api_keys_file else None
    load_admin_key(s)  # a bad key file is refused before the engine is warmed
    if keys is None:
        where = "only this machine can reach it" if s.host in LOOPBACK_HOSTS else \
            f"ANYONE who can reach {s.host} can query it and read every cached answer"
        log.warning("no API keys (server.api_keys_file): bound to %s, %s", s.host, where)
    # Verify the index and warm the engine before accepting.
    rag = RAG.from_index(index, config, embedder=embedder, generator=generator)
    try:
        app = create_app(rag, config, keys=keys)
        uv = uvicorn.Config(app, host=s.host, port=s.port, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=1, lifespan="on", **uvicorn_options(s, app))
        server = DrainingServer(uv, app.state.served.state, s.drain_grace_s, ready_file, on_hangup=rag.reload)
        server.run()
    finally:
        rag.close()  # cancels what is left (vLLM aborts it), flushes cache writes, stops the engine
    log.info("ragserve stopped")


class DrainingServer(uvicorn.Server):
    """uvicorn's ``Server`` with a drain before its own shutdown (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, state: ServingState, grace_s: float,
                 ready_file: Path | None = None, on_hangup: Callable[[], Any] | None = None) -> None:
        super().__init__(config)
        self.state = state
        self.grace_s = grace_s
        self.ready_file = ready_file
        self.on_hangup = on_hangup
        self._reloads: set[asyncio.Task[None]] = set()
        self._drain_started = 0.0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # NOTE: uvicorn's own handler records the signal and raises it again after shutdown,
        # which would end the process by the signal instead of with status 0.
        state = self.state
        if state.draining:
            log.warning("second signal: aborting %d request(s) in flight", state.in_flight)
            self.force_exit = self.should_exit = True
            return
        state.draining = True
        self._drain_started = time.monotonic()
        log.warning("%s: draining %d request(s) in flight (grace %g s)", signal.Signals(sig).name,
                    state.in_flight, self.grace_s)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.on_hangup is not None and threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload)
        if self.ready_file is not None and self.started:
            self.ready_file.write_text(str(self.servers[0].sockets[0].getsockname()[1]))

    async def shutdown(self, sockets: Any = None) -> None:
        if self.on_hangup is not None and threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)  # no reload while closing
        await super().shutdown(sockets)

    def _reload(self) -> None:
        """SIGHUP: reload the index off the event loop, as ``POST /admin/reload`` does."""
        async def run() -> None:
            try:
                log.info("SIGHUP reload: %s", await asyncio.to_thread(self.on_hangup))  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001 - a refused index leaves the current one serving
                log.error("SIGHUP reload refused, still serving the current index: %s", e)

        task = asyncio.ensure_future(run())
        self._reloads.add(task)  # a reference, or the task could be collected half-way
        task.add_done_callback(self._reloads.discard)

    async def on_tick(self, counter: int) -> bool:
        state = self.state
        if state.draining and not self.should_exit:
            if state.in_flight == 0 or time.monotonic() - self._drain_started >= self.grace_s:
                self.should_exit = True
        return await super().on_tick(counter)
