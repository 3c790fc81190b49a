"""Fakes of the heavy stages, for fast unit tests of logic (the real ones have their own
integration tests): an embedder, a generator, a tokenizer, and a ``RAG`` built on them.

**Usage:**

    from ragserve.testing.fakes import FakeGenerator, fake_rag
    with fake_rag(tmp_path, generator=FakeGenerator(delay=0.5)) as rag:
        assert rag.query("chunk number 3").answer
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from ragserve.config import RAGConfig
from ragserve.index.manifest import Manifest
from ragserve.rag import RAG
from ragserve.retrieval.docstore import LazyDocStore, write_docstore
from ragserve.retrieval.faiss_index import FaissIndex
from ragserve.types import Chunk, Generation, TokenUsage

DIM = 8
"""The fake embedder's dimension, and the number of chunks ``fake_rag`` serves."""


class WordTokenizer:
    """A stand-in tokenizer: one token per whitespace-separated word."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}> {m['content']} </{m['role']}> " for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens=False):
        return text.split()

    def decode(self, ids):
        return " ".join(ids)


class FakeEmbedder:
    """One-hot vectors: a text lands on the dimension its characters hash to, so the chunk
    whose id matches wins."""

    dim = DIM
    identity = {"name": "fake", "identity": "fake"}

    def __init__(self):
        self.calls = 0

    def warm_up(self):
        pass

    def encode(self, texts, *, batch_size=None):
        self.calls += 1
        out = np.zeros((len(texts), DIM), np.float32)
        for i, t in enumerate(texts):
            out[i, sum(map(ord, t)) % DIM] = 1.0
        return out


class WordsEmbedder:
    """A bag of words hashed onto ``dim`` dimensions, unit length: questions that share most
    words are close, as with a real model (the semantic tier's unit tests)."""

    identity = {"name": "words", "identity": "words"}

    def __init__(self, dim=DIM):
        self.dim = dim
        self.texts = []

    def warm_up(self):
        pass

    def encode(self, texts, *, batch_size=None):
        import hashlib

        self.texts.extend(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace("?", " ").split():
                out[i, int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "little") % self.dim] += 1
            out[i] /= np.linalg.norm(out[i]) or 1.0
        return out


class CountingEmbedder:
    """A real embedder, recording every text it is asked to embed (``identity`` can be
    overridden to stand for another model)."""

    def __init__(self, inner, identity=None):
        self.inner, self.texts = inner, []
        self.identity = identity or inner.identity

    def encode(self, texts, *, batch_size=None):
        self.texts.extend(texts)
        return self.inner.encode(texts, batch_size=batch_size)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FakeGenerator:
    """A ``types.Generator`` that answers ``words`` pieces ``delay`` seconds apart, and
    fails for a prompt that contains ``fail_on``. While ``hold`` is True, every stream waits
    before its next piece: a test keeps generations in flight for as long as it needs (no
    delay to outlast), then clears it. ``answer(prompt) -> str``: answer that instead, a
    word per piece (an answer that depends on the prompt: its sources, its question)."""

    model_name = "fake-llm"

    def __init__(self, fail_on=None, delay=0.01, words=2, answer=None):
        self.answer = answer
        self.prompts = []
        self.request_ids = []
        self.priorities = []
        """The ``priority=`` each stream was started with (None: not given)."""
        self.fail_on = fail_on
        self.delay = delay
        self.words = words
        self.running = 0
        self.hold = False

    def warm_up(self):
        pass

    def tokenizer(self):
        return WordTokenizer()

    async def generate(self, prompt, request_id, token_ids=None, priority=None):
        gen = None
        async for piece in self.stream(prompt, request_id, priority=priority):
            gen = piece
        return gen

    async def stream(self, prompt, request_id, token_ids=None, deltas=True, priority=None):
        """Like vLLM: ``words`` pieces ``delay`` seconds apart, then the ``Generation``
        (the pieces too when ``deltas`` is off: the pipeline must cope with either)."""
        self.prompts.append(prompt)
        self.request_ids.append(request_id)
        self.priorities.append(priority)
        self.running += 1
        try:
            if self.answer is not None:
                pieces = [(" " if i else "") + w for i, w in enumerate(self.answer(prompt).split())] or [""]
            else:
                pieces = (["an", " answer"] + [" more"] * self.words)[: self.words]
            for piece in pieces:
                while self.hold:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(self.delay / len(pieces))
                if self.fail_on and self.fail_on in prompt:
                    raise RuntimeError("boom")
                yield piece
            yield Generation("".join(pieces), TokenUsage(len(prompt.split()), len(pieces)), "stop", 1.0, 2.0, 3.0)
        finally:
            self.running -= 1

    def unfinished(self):
        return self.running

    def shutdown(self):
        pass


def fake_rag(folder: Path, generator: Any = None, *, embedder: Any = None, config: RAGConfig | None = None,
             generators: dict[str, Any] | None = None, **sections: dict[str, Any]) -> RAG:
    """A ``RAG`` over ``DIM`` one-chunk documents written to ``folder`` ("chunk number i"),
    with the fake embedder and ``generator`` (default: a ``FakeGenerator``). ``config``,
    or ``sections`` as for ``RAGConfig.replace``. ``generators``: one per model of
    ``[models]`` (then ``generator`` defaults to none: the default model's is in them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_docstore(folder, [Chunk(i, f"doc{i}.txt", f"chunk number {i}") for i in range(DIM)])
    index = FaissIndex.build(np.eye(DIM, dtype=np.float32), "flat-fp16")
    manifest = Manifest(folder, {"fingerprint": "f" * 64, "embedding": {"dim": DIM}})
    return RAG(manifest, index, LazyDocStore(folder), embedder or FakeEmbedder(),
               generator or (None if generators else FakeGenerator()), config or RAGConfig().replace(**sections),
               generators=generators)


def opening(monkeypatch: Any, rag: RAG) -> list[str]:
    """Make ``RAG.from_index`` give ``rag`` whatever path it is asked for (a CLI test's
    stand-in for an index on disk, through pytest's ``monkeypatch``); returns the list of
    the paths asked for, filled as commands open them."""
    import contextlib

    opened: list[str] = []

    @contextlib.contextmanager
    def this_rag(path: Any, cfg: Any = None, **options: Any) -> Any:  # (start_engine=, embedder=...)
        opened.append(str(path))
        yield rag

    monkeypatch.setattr(RAG, "from_index", this_rag)
    return opened
