"""Query and chunk embeddings with sentence-transformers.

The constructor is cheap; ``warm_up()`` loads the model (idempotent). ``encode`` follows
sentence-transformers' own batching (sorted by length, restored order, inference mode)
and returns unit-length float32 C-contiguous rows, the layout FAISS wants.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ragserve.config import EmbedConfig
from ragserve.errors import ModelError
from ragserve.models import model_identity, resolve_embedding_model


class SentenceTransformerEmbedder:
    """**Usage:** ``emb = SentenceTransformerEmbedder(EmbedConfig()); emb.encode(["q"])``"""

    def __init__(self, config: EmbedConfig | None = None) -> None:
        self.config = config or EmbedConfig()
        self.path = resolve_embedding_model(self.config.model)
        self.identity: dict[str, Any] = model_identity(self.path)
        self._model: Any = None
        self._lock = threading.Lock()

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
                self._model = SentenceTransformer(str(self.path), device=_device(self.config.device))
            except (OSError, ValueError) as e:
                raise ModelError(f"cannot load embedding model {self.path}: {e}", stage="embed") from e

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
        vectors = self.model.encode(
            list(texts),
            batch_size=batch_size or self.config.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress_bar,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
