"""The test-support embedder that replays identical calls (``ragserve.testing.embedders``):
what it replays is exactly one call the model made, and nothing else."""

import numpy as np

from ragserve.config import EmbedConfig
from ragserve.retrieval import embed
from ragserve.testing.embedders import ReplayEmbedder, sharing
from ragserve.testing.fakes import CountingEmbedder


class Batchy:
    """A model whose vectors depend on the batch a text is in (as bf16 padding does)."""

    identity = {"name": "batchy", "identity": "b" * 64}
    dim = 2
    config = EmbedConfig()

    def __init__(self):
        self.calls = []

    def encode(self, texts, *, batch_size=None):
        self.calls.append((list(texts), batch_size))
        return np.array([[len(t), len(texts) * 10 + (batch_size or 0)] for t in texts], np.float32)


def test_only_the_very_same_call_is_replayed_and_the_rest_computed():
    model = Batchy()
    memo = ReplayEmbedder(model)
    first = memo.encode(["a", "bb"], batch_size=4)
    again = memo.encode(["a", "bb"], batch_size=4)
    assert np.array_equal(first, again) and len(model.calls) == 1
    # another order, another batch size, a text alone: other calls, made by the model
    for texts, size in ((["bb", "a"], 4), (["a", "bb"], 8), (["a"], 4)):
        assert np.array_equal(memo.encode(texts, batch_size=size), model.encode(texts, batch_size=size))
    assert memo.calls == 5 and memo.computed == 4
    # no batch size is the model's default, so an explicit equal one is the same call
    memo.encode(["a", "bb"], batch_size=64)
    memo.encode(["a", "bb"])
    assert memo.computed == 5
    # what a caller does to its vectors never reaches the next caller's
    again[:] = 0
    assert np.array_equal(memo.encode(["a", "bb"], batch_size=4), first)
    assert memo.identity == model.identity and memo.dim == 2


def test_a_counting_wrapper_sees_every_text_asked_for_replayed_or_not():
    memo = ReplayEmbedder(Batchy())
    counter = CountingEmbedder(memo)
    counter.encode(["a", "bb"], batch_size=4)
    counter.encode(["a", "bb"], batch_size=4)
    assert counter.texts == ["a", "bb", "a", "bb"] and memo.computed == 1


def test_sharing_gives_the_shared_embedder_for_its_config_only():
    memo = ReplayEmbedder(Batchy())
    real = embed.SentenceTransformerEmbedder
    with sharing(memo):
        assert embed.SentenceTransformerEmbedder(EmbedConfig()) is memo
        assert embed.SentenceTransformerEmbedder() is memo
        assert embed.SentenceTransformerEmbedder(config=EmbedConfig()) is memo
        other = embed.SentenceTransformerEmbedder(EmbedConfig(batch_size=8))
        assert isinstance(other, real) and other.config.batch_size == 8
    assert embed.SentenceTransformerEmbedder is real
