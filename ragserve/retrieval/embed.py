"""Query and chunk embeddings with sentence-transformers, and the query micro-batcher.

The constructor is cheap; ``warm_up()`` loads the model (idempotent). ``encode`` follows
sentence-transformers' own batching (sorted by length, restored order, inference mode)
and returns unit-length float32 C-contiguous rows, the layout FAISS wants.

``MicroBatcher`` gathers the queries that arrive together into one model call (and one
FAISS search): a batch of 32 short questions costs little more than one question. A batch
whose call fails is split and retried, so one bad item fails only its own caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

import numpy as np

from ragserve.config import EmbedConfig
from ragserve.errors import ModelError
from ragserve.models.resolve import model_identity, resolve_embedding_model


class SentenceTransformerEmbedder:
    """**Usage:** ``emb = SentenceTransformerEmbedder(EmbedConfig()); emb.encode(["q"])``"""

    def __init__(self, config: EmbedConfig | None = None) -> None:
        self.config = config or EmbedConfig()
        self.path = resolve_embedding_model(self.config.model)
        self.identity: dict[str, Any] = model_identity(self.path)
        self._model: Any = None
        self._lock = threading.Lock()
        self._precision = "float32"

    def warm_up(self) -> None:
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            # NOTE: the model is on disk; never let a missing file turn into a hub download.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import torch
            from sentence_transformers import SentenceTransformer

            if self.config.threads:
                torch.set_num_threads(self.config.threads)
            try:
                model = SentenceTransformer(str(self.path), device=_device(self.config.device))
            except (OSError, ValueError) as e:
                raise ModelError(f"cannot load embedding model {self.path}: {e}", stage="embed") from e
            self._precision = resolve_precision(self.config.precision, model.device.type)
            self._model = model

    @property
    def precision(self) -> str:
        """The compute precision in use: "float32" or "bfloat16" (loads the model)."""
        self.warm_up()
        return self._precision

    @property
    def model(self) -> Any:
        self.warm_up()
        return self._model

    @property
    def dim(self) -> int:
        m = self.model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    def token_counter(self) -> Callable[[str], list[int]]:
        """The model's own tokenizer, for a splitter that sizes chunks in its tokens."""
        tok = self.model.tokenizer
        # NOTE: not the Rust ``backend_tokenizer``: the model configures it to truncate at
        # max_seq_length, so every text would look short enough and never be split.
        return lambda text: tok.encode(text, add_special_tokens=False, truncation=False)

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        show_progress_bar: bool = False,
    ) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self.model
        with self._autocast():
            vectors = model.encode(
                list(texts),
                batch_size=batch_size or self.config.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=show_progress_bar,
            )
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.precision != "float32":  # unit length in float32, as inner-product search assumes
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def _autocast(self) -> Any:
        import torch

        if self.precision == "bfloat16":
            return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_precision(precision: str, device_type: str) -> str:
    """``embed.precision`` for a model on ``device_type``: "auto" is bfloat16 only on a CPU
    with native bf16 (on a GPU, float32 until measured there)."""
    if precision != "auto":
        return precision
    return "bfloat16" if device_type == "cpu" and cpu_has_native_bf16() else "float32"


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX): there torch's
    bf16 matmuls are about twice as fast as float32; elsewhere they are emulated."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        return set()


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Runs ``fn(items) -> results`` on an executor for batches of concurrent submissions.

    The first item to reach an idle batcher waits ``window_s`` for others to join (or
    until ``max_batch`` are in); items that arrive while a batch runs are taken as soon
    as it ends, without a window: they have waited already. The event loop never runs
    ``fn`` itself. A cancelled submission is dropped from its batch if that has not
    started yet. Use from one event loop.

    Failure isolation: when ``fn`` raises for a batch, the batch is halved and each half
    retried (on the executor, in the same job), down to single items; each item gets its
    own result or the error ``fn`` raised for it alone. One bad item among n costs about
    2·log2(n) extra calls rather than n, and a failure that is not item-specific (the
    model is broken) reaches every item. ``BaseException`` (interrupts) is never retried.

    **Usage:** ``b = MicroBatcher(embed_and_search, executor, window_s=0.002, max_batch=64)``
    then ``result, wait_ms = await b.submit(item)``.
    """

    def __init__(self, fn: Callable[[list[T]], list[R]], executor: Executor | None, *,
                 window_s: float, max_batch: int) -> None:
        self.fn = fn
        self.executor = executor
        self.window_s = window_s
        self.max_batch = max_batch
        self.batches = 0
        self.items = 0
        self._pending: list[tuple[T, asyncio.Future[tuple[R, float]], float]] = []
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def submit(self, item: T) -> tuple[R, float]:
        """Returns ``fn``'s result for this item and the ms it waited for its batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[R, float]] = loop.create_future()
        self._pending.append((item, future, time.perf_counter()))
        if not self._busy:
            if len(self._pending) >= self.max_batch or self.window_s <= 0:
                self._start()
            elif self._timer is None:
                self._timer = loop.call_later(self.window_s, self._start)
        return await future

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy:
            return  # the running batch starts the next one when it ends
        live = [p for p in self._pending if not p[1].done()]
        batch, self._pending = live[: self.max_batch], live[self.max_batch:]
        if not batch:
            return
        self._busy = True
        self.batches += 1
        self.items += len(batch)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        task = loop.run_in_executor(self.executor, self._isolated, [item for item, _, _ in batch])
        task.add_done_callback(lambda t: self._finish(t, batch, started))

    def _isolated(self, items: list[T]) -> list[R | Exception]:
        """``fn(items)``; if it raises, each half again, so an error stays with its item."""
        try:
            results = self.fn(items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            return list(results)
        except Exception as e:  # noqa: BLE001 - the error is handed to the item(s) it belongs to
            if len(items) == 1:
                return [e]
            mid = len(items) // 2
            return self._isolated(items[:mid]) + self._isolated(items[mid:])

    def _finish(self, task: asyncio.Future[list[R | Exception]], batch: list[Any], started: float) -> None:
        self._busy = False
        error = task.exception()  # only a BaseException, or the executor refusing the job
        outcomes = [error] * len(batch) if error is not None else task.result()
        for outcome, (_, future, submitted) in zip(outcomes, batch):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result((outcome, (started - submitted) * 1e3))
        if self._pending:
            self._start()
