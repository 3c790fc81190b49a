"""A real embedder that does not compute the same call twice, for integration tests that
build and rebuild indexes over the same texts but do not test the embedding model itself.

``ReplayEmbedder`` wraps a real embedder (the test session's MiniLM): the first time it
is asked to embed a list of texts with a batch size, the real model embeds them; when the
very same call comes again (the same texts, in the same order, the same batch size), it
returns a copy of the vectors the model returned the first time. The key is the whole call,
not each text: in bfloat16 a text's vector depends on the batch it is embedded in (padding),
so a replayed call gives exactly what the model would give, and a call the model has not
seen (an incremental build's few new chunks, a question embedded alone rather than in a
batch) is computed for real. What the replay assumes is that the model is deterministic
for one call, as the builds' fingerprints do; a test of that (two builds give the same
fingerprint) must use the real embedder, not this one.

Tests that count what a builder embeds wrap this one: ``CountingEmbedder(ReplayEmbedder(e))``
records every text the builder asks for, replayed or not.

``sharing(embedder)`` is for in-process CLI tests (``typer``'s ``CliRunner``): while it is
active, a ``SentenceTransformerEmbedder`` constructed with the same ``EmbedConfig`` as
``embedder`` is ``embedder`` (the model loaded once per session, not per command); one
constructed with any other configuration is a new, real one, so a CLI that passes the
wrong settings still gets the embedder those settings make.

**Usage:**

    memo = ReplayEmbedder(SentenceTransformerEmbedder(EmbedConfig()))
    build_index("docs/", "idx-a", embedder=memo)
    build_index("docs/", "idx-b", embedder=memo)  # the model is not run again
    with sharing(memo):
        CliRunner().invoke(app, ["build-index", "docs/", "--out", "idx-c"])
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


class ReplayEmbedder:
    """A real embedder whose identical calls are computed once (see the module's doc).
    ``calls`` counts the calls, ``computed`` those the model ran."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.computed = 0
        self._seen: dict[tuple[tuple[str, ...], int | None], np.ndarray] = {}
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None, **kwargs: Any) -> np.ndarray:
        if batch_size is None:  # the inner default, so that an explicit equal size is the same call
            batch_size = getattr(getattr(self.inner, "config", None), "batch_size", None)
        key = (tuple(texts), batch_size)
        with self._lock:
            self.calls += 1
            vectors = self._seen.get(key)
        if vectors is None:
            vectors = self.inner.encode(texts, batch_size=batch_size, **kwargs)
            with self._lock:
                self.computed += 1
                self._seen[key] = vectors.copy()
        return vectors.copy()

    def __getattr__(self, name: str) -> Any:
        # identity, dim, config, path, precision, max_seq_length, token_counter, warm_up, model
        return getattr(self.inner, name)


@contextlib.contextmanager
def sharing(embedder: Any) -> Iterator[None]:
    """While active, ``SentenceTransformerEmbedder(config)`` is ``embedder`` when ``config``
    equals the config ``embedder`` was made with (see the module's doc)."""
    from ragserve.retrieval import embed

    real = embed.SentenceTransformerEmbedder
    shared = embedder.config

    def make(config: Any = None) -> Any:  # the real constructor's signature
        return embedder if (config or type(shared)()) == shared else real(config)

    embed.SentenceTransformerEmbedder = make  # type: ignore[assignment, misc]
    try:
        yield
    finally:
        embed.SentenceTransformerEmbedder = real  # type: ignore[misc]
