"""Shared fixtures.

Tiers: unit tests (fakes for logic, fast), ``integration`` (real MiniLM embeddings, real
FAISS, real files), ``engine`` (a real vLLM engine with the default model — one per test
session, shared through the ``rag`` fixture).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
XQUAD = ROOT.parent / "shared" / "data" / "xquad-en" / "xquad.en.json"
BENCHMARKS = ROOT / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module, imported by name with ``benchmarks/`` on
    ``sys.path`` as when the script runs (its modules import ``harness`` and each other by
    name). Appended: an installed package of the same name would win, never the reverse."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    return importlib.import_module(name)


def xquad_articles(n_articles: int) -> list[dict]:
    if not XQUAD.is_file():
        pytest.fail(f"the XQuAD data set is missing at {XQUAD}")
    return json.loads(XQUAD.read_text("utf-8"))["data"][:n_articles]


def write_xquad_corpus(folder: Path, n_articles: int) -> list[dict]:
    """One .txt per paragraph (``Title_N.txt``); returns the questions with their file."""
    folder.mkdir(parents=True, exist_ok=True)
    questions = []
    for article in xquad_articles(n_articles):
        for i, para in enumerate(article["paragraphs"]):
            name = f"{article['title']}_{i}.txt"
            (folder / name).write_text(para["context"], encoding="utf-8")
            for qa in para["qas"]:
                questions.append({"question": qa["question"], "doc_id": name,
                                  "answers": [a["text"] for a in qa["answers"]]})
    return questions


@pytest.fixture(scope="session")
def xquad_corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("xquad") / "corpus"
    return folder, write_xquad_corpus(folder, n_articles=8)


@pytest.fixture(scope="session")
def embedder():
    from ragserve.config import EmbedConfig
    from ragserve.retrieval.embed import SentenceTransformerEmbedder

    e = SentenceTransformerEmbedder(EmbedConfig())
    e.warm_up()
    return e


@pytest.fixture(scope="session")
def replay_embedder(embedder):
    """The session's MiniLM, computing each identical ``encode`` call once (the same texts
    in the same order, the same batch size: then the model's own vectors again). For tests
    that build over the same texts but do not test the model; ``ragserve.testing.embedders``
    says what it assumes, and which tests must use ``embedder`` instead."""
    from ragserve.testing.embedders import ReplayEmbedder

    return ReplayEmbedder(embedder)


@pytest.fixture(scope="session")
def xquad_index(tmp_path_factory, xquad_corpus, replay_embedder) -> Path:
    """A real fp16 index over 8 XQuAD articles (about 40 paragraphs). Built through
    ``replay_embedder``, so that a test's own build of the same corpus replays its call."""
    from ragserve.build.builder import build_index
    from ragserve.config import RAGConfig

    out = tmp_path_factory.mktemp("indexes") / "xquad"
    build_index(xquad_corpus[0], out, RAGConfig(), embedder=replay_embedder)
    return out


@pytest.fixture
def fake_rag(tmp_path):
    """A ``RAG`` on fakes (``ragserve.testing.fakes``) that fails on prompts with "poison".
    One-hot vectors: every source but the best scores 0, far below it; keep them all here."""
    from ragserve.config import RAGConfig
    from ragserve.testing.fakes import FakeGenerator, fake_rag

    with fake_rag(tmp_path, FakeGenerator(fail_on="poison"), config=RAGConfig().replace(prompt={"max_score_gap": 0})) as rag:
        yield rag


@pytest.fixture(scope="session")
def rag(xquad_index):
    """The one real vLLM engine of the test session."""
    from ragserve import RAG, RAGConfig

    cfg = RAGConfig().replace(generate={"max_tokens": 32}, vllm={"kv_cache_gib": 1})
    with RAG.from_index(xquad_index, cfg) as r:
        yield r


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the session's ``ray`` tests (Ray Data builds, Ray Serve),
    started here and shut down at the end: two CPUs, no dashboard, logs in a temp folder.
    Started as ragserve starts its own, so a killed test session leaves no cluster behind."""
    ray = pytest.importorskip("ray", reason="ray[serve] is in the CPU lock; run `make setup`")
    from ragserve.ray.cluster import start_local

    reaper = start_local(ray, num_cpus=2, include_dashboard=False, log_to_driver=False,
                         _temp_dir=str(tmp_path_factory.mktemp("ray")), namespace="ragserve-tests")
    try:
        yield ray.get_runtime_context()
    finally:
        try:
            ray.shutdown()
        finally:
            reaper.done()


def pytest_collection_modifyitems(config, items):
    # Engine and Ray tests imply integration; order them last so fast failures show first.
    for item in items:
        if "engine" in item.keywords or "ray" in item.keywords:
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda i: ("engine" in i.keywords, "integration" in i.keywords))


def write_squad_slice(path: Path, n_articles: int) -> Path:
    """The first ``n_articles`` of XQuAD as a SQuAD-style file (what ``ragserve eval`` reads)."""
    path.write_text(json.dumps({"version": "slice", "data": xquad_articles(n_articles)}), encoding="utf-8")
    return path


def write_beir_from_squad(folder: Path, n_articles: int) -> Path:
    """The same paragraphs and questions laid out as a BEIR data set (corpus, queries, qrels)."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for article in xquad_articles(n_articles):
        for i, para in enumerate(article["paragraphs"]):
            doc_id = f"{article['title']}#{i}"
            corpus.append({"_id": doc_id, "title": "", "text": para["context"]})
            for qa in para["qas"]:
                queries.append({"_id": qa["id"], "text": qa["question"]})
                qrels.append(f"{qa['id']}\t{doc_id}\t1")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries), encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")
    return folder
