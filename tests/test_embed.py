"""The real embedding model's compute precisions (integration: the packaged MiniLM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragserve.config import EmbedConfig
from ragserve.retrieval.embed import SentenceTransformerEmbedder, cpu_has_native_bf16, resolve_precision

pytestmark = pytest.mark.integration

QUESTIONS = ["When did the last glacial period start?", "What does the User Datagram Protocol guarantee?",
             "Who presented evidence on global inequality in 2009?", "short", "x " * 200]


def test_bfloat16_vectors_are_unit_float32_and_close_to_float32():
    bf16 = SentenceTransformerEmbedder(EmbedConfig(precision="bfloat16"))
    fp32 = SentenceTransformerEmbedder(EmbedConfig(precision="float32"))
    a, b = bf16.encode(QUESTIONS), fp32.encode(QUESTIONS)
    assert a.dtype == np.float32 and a.flags.c_contiguous and a.shape == b.shape
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    cos = (a * b).sum(axis=1)
    assert cos.min() > 0.999, cos  # bf16 rounding is far below what changes a ranking
    # The same question must not move between precisions more than different questions differ.
    assert (a @ b.T).argmax(axis=1).tolist() == list(range(len(QUESTIONS)))


def test_auto_precision_follows_the_device_and_the_cpu():
    native = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert SentenceTransformerEmbedder(EmbedConfig(precision="auto", device="auto")).precision == (
        "float32" if torch.cuda.is_available() else native)
    assert resolve_precision("auto", "cpu") == native
    assert resolve_precision("auto", "cuda") == "float32"
    assert resolve_precision("float32", "cpu") == "float32" and resolve_precision("bfloat16", "cuda") == "bfloat16"
