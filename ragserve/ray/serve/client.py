"""``RayGenerator``: the ``types.Generator`` of an ingress replica, over a ``DeploymentHandle``
of the generator deployment (``generator.py``).

The pipeline uses it as any backend (``RAG.from_index(..., generator=RayGenerator(...))``):

- **Generation** goes to the deployment: ``generate`` as one handle call, ``stream`` as a
  streaming one (``handle.options(stream=True)``). Serve's router picks the generator
  replica (fewest requests queued).
- **Cancellation.** Cancelling the awaiting task, or closing the stream early, cancels the
  handle call (``response.cancel()``): Serve cancels the task on the generator replica,
  which aborts the engine's request. This is explicit because the pipeline runs on its
  own loop thread, outside the Serve request whose cancellation Serve would propagate.
- **Stage split and usage** are the wrapped backend's own (``Generation.queue_ms``,
  ``first_token_ms``, ``decode_ms``: vLLM's queue, prefill and decode), carried back
  unchanged; the Ray hop is what the caller's ``generate`` time adds to their sum.
- **Token budgeting** needs the tokenizer here, in the ingress replica: the one of the local
  model folder ``generate.model`` names (``tokenizers.local_tokenizer``: tokenizer files
  only, no weights), or with ``openai.tokenizer = "server"`` the servers' ``/tokenize``.
  The prompt goes to the generator as text and token ids, so it is not tokenized again.
- **Errors.** A ragserve error raised on the generator replica is raised here as itself; a
  generator replica that died or cannot be reached (``RayActorError``,
  ``DeploymentUnavailableError``) is ``GeneratorUnavailableError`` (HTTP 503: Serve
  replaces it; retry); Serve's queue bound for the generator
  (``ray.generator_max_queued_requests``, ``BackPressureError``) is ``OverloadedError``
  (HTTP 429 + ``Retry-After``, as ragserve's own admission).
- **Models.** With ``[models]`` there is one ``RayGenerator`` per model, each naming its
  model on every call (``model=``) to the deployment that serves it
  (``app.generator_groups``; models sharing a vLLM engine share a deployment).
- **Health and stats** (``alive``, ``stats``: read per request, so never a remote call)
  come from a probe of the deployment's ``status`` every ``probe_interval_s``;
  ``unfinished`` counts this replica's own calls in flight.

NOTE: the handle is used from the pipeline's loop thread, not from the replica's event
loop. That works because Serve runs each handle's router in a loop of its own
(``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1``, the default); ``warm_up`` refuses otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ragserve.errors import (
    ConfigError,
    GenerationError,
    GeneratorUnavailableError,
    OverloadedError,
    RagserveError,
)
from ragserve.observe.propagation import traceparent_for
from ragserve.types import Generation

log = logging.getLogger("ragserve.generate")


class RayGenerator:
    """**Usage** (inside an ingress replica; ``ingress.py`` does this):

        info = await handle.describe.remote()
        gen = RayGenerator(handle, info, local_tokenizer(cfg.generate.model))
        rag = RAG.from_index(index, cfg, generator=gen)
    """

    def __init__(self, handle: Any, info: dict[str, Any], tokenizer: Any, *,
                 probe_interval_s: float = 2.0, model: str = "") -> None:
        self._handle = handle
        # the model's name on every call, when the deployment serves [models] ("": its only one)
        self._model: dict[str, str] = {"model": model} if model else {}
        self._streams = handle.options(stream=True)
        self.model_name: str = info["model_name"]
        self.backend: str = info.get("backend", "")
        self._tokenizer = tokenizer
        self._status: dict[str, Any] = dict(info)
        self._status_at = time.monotonic()
        self._probe_interval_s = probe_interval_s
        self._prober: asyncio.Task[None] | None = None
        self.outstanding = 0
        self.requests = self.cancelled = self.failed = self.unavailable = 0

    # -- life cycle --------------------------------------------------------------------

    def warm_up(self) -> None:
        """Start the status probe on the calling loop (idempotent; the pipeline calls this
        on its engine loop for every request)."""
        if self._prober is not None:
            return
        from ray.serve._private import constants

        if not constants.RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP:
            raise ConfigError("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP",
                              "ragserve calls the generator deployment from its own loop thread, which needs "
                              "Serve's routers in their own loop: unset it or set it to 1 (the default)")
        with contextlib.suppress(RuntimeError):  # no running loop: probe later, from one
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    async def aclose(self) -> None:
        """Stop the probe (``RAG.close`` awaits this). The deployment lives on: it belongs
        to the application, not to this replica."""
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober

    def shutdown(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            self._prober = None

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval_s)
            await self.probe()

    async def probe(self) -> None:
        """Ask the deployment for its status now. A generator that cannot be reached is
        marked not alive; one that is only slow to answer keeps its last status."""
        response = self._handle.status.remote(**self._model)
        try:
            status = await asyncio.wait_for(response, timeout=max(self._probe_interval_s, 5.0))
        except asyncio.TimeoutError:
            response.cancel()
            return
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - any failure to reach it is "not alive" until a probe answers
            if not isinstance(self._error(e, "status probe"), GeneratorUnavailableError):
                log.warning("generator status probe failed: %s: %s", type(e).__name__, e)
            self._status = {**self._status, "alive": False, "error": f"{type(e).__name__}: {e}"}
            self._status_at = time.monotonic()
            return
        self._status, self._status_at = status, time.monotonic()

    # -- the Generator protocol ----------------------------------------------------------

    def tokenizer(self) -> Any:
        return self._tokenizer

    def alive(self) -> bool:
        """The last status the deployment gave (or that it could not be reached)."""
        return bool(self._status.get("alive", True))

    def unfinished(self) -> int:
        """This replica's calls to the generator deployment still in flight."""
        return self.outstanding

    def stats(self) -> dict[str, Any]:
        """The deployment's last status (its backend's stats: vLLM's prefix-cache counters,
        or the openai backend's endpoints) and this replica's calls to it."""
        s = self._status
        backend_stats = s.get("stats") or {}
        return {"backend": f"ray:{self.backend}", "model": self.model_name, "alive": self.alive(),
                "status_age_s": round(time.monotonic() - self._status_at, 3),
                "deployment": {"unfinished": s.get("unfinished"), "replica": s.get("replica"),
                               "error": s.get("error")},
                "calls": {"outstanding": self.outstanding, "requests": self.requests,
                          "cancelled": self.cancelled, "failed": self.failed,
                          "unavailable": self.unavailable},
                **({"prefix_cache": backend_stats["prefix_cache"]} if "prefix_cache" in backend_stats
                   else {}),
                "backend_stats": s.get("stats")}

    async def reset_prefix_cache(self) -> bool:
        """Reset the prefix cache of the generator replica Serve routes this call to (one
        replica: the CPU case; with several, call it until each has answered True)."""
        return bool(await self._handle.reset_prefix_cache.remote(**self._model))

    async def generate(self, prompt: str, request_id: str, *,
                       token_ids: list[int] | None = None, priority: int = 0) -> Generation:
        """The whole answer, in one handle call."""
        self.requests += 1
        self.outstanding += 1
        response = self._handle.generate.remote(prompt, request_id, token_ids, priority,
                                                traceparent_for(request_id), **self._model)
        try:
            return await response
        except asyncio.CancelledError:
            self.cancelled += 1
            response.cancel()  # the generator replica's task is cancelled: the engine aborts it
            raise
        except Exception as e:  # noqa: BLE001 - mapped to ragserve's error tree
            raise self._failed(e, request_id) from None
        finally:
            self.outstanding -= 1

    async def stream(self, prompt: str, request_id: str, *, token_ids: list[int] | None = None,
                     deltas: bool = True, priority: int = 0) -> AsyncIterator[str | Generation]:
        """Text deltas as the generator replica yields them, then the ``Generation``.
        ``deltas=False``: one unary call, only the ``Generation`` comes back."""
        if not deltas:
            yield await self.generate(prompt, request_id, token_ids=token_ids, priority=priority)
            return
        self.requests += 1
        self.outstanding += 1
        pieces = self._streams.stream.remote(prompt, request_id, token_ids, priority,
                                             traceparent_for(request_id), **self._model)
        finished = False
        try:
            while True:
                try:
                    piece = await pieces.__anext__()
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - mapped to ragserve's error tree
                    finished = True  # the call is over on the generator's side
                    raise self._failed(e, request_id) from None
                yield piece
            finished = True
        finally:
            self.outstanding -= 1
            if not finished:  # cancelled, or the caller stopped reading: abort it over there
                self.cancelled += 1
                pieces.cancel()

    # -- errors --------------------------------------------------------------------------

    def _failed(self, e: BaseException, request_id: str) -> Exception:
        error = self._error(e, f"request {request_id}")
        self.failed += 1
        if isinstance(error, GeneratorUnavailableError):
            self.unavailable += 1
            self._status = {**self._status, "alive": False, "error": f"{type(e).__name__}: {e}"}
            self._status_at = time.monotonic()
        return error

    def _error(self, e: BaseException, what: str) -> Exception:
        """ragserve's error for what a handle call raised (see the module docstring)."""
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        cause = e
        if isinstance(e, RayTaskError) and e.cause is not None:
            cause = e.cause
        if isinstance(cause, RagserveError):
            return cause
        if isinstance(cause, BackPressureError):
            queued, bound = (list(cause.args) + [0, 0])[:2]
            return OverloadedError(queued, bound, "overloaded: the generator deployment's queue is full "
                                   f"({cause.message}; ray.generator_max_queued_requests); retry later")
        if isinstance(cause, (RayActorError, DeploymentUnavailableError)):
            return GeneratorUnavailableError(
                f"{what}: the generator deployment cannot take it now ({type(cause).__name__}: {cause}); "
                "Ray replaces a failed replica, retry")
        return GenerationError(f"{what} failed in the generator deployment: {type(cause).__name__}: {cause}")
