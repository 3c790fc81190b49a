"""Every index type against exact search on seeded synthetic data (FAISS's own test style)."""

from pathlib import Path

import numpy as np
import pytest

from ragserve.config import IndexConfig
from ragserve.errors import IndexIntegrityError
from ragserve.index.manifest import write_manifest
from ragserve.index.verify import verify
from ragserve.retrieval.faiss_index import INDEX_FILE, FaissIndex
from ragserve.retrieval.index_spec import INDEX_TYPES, IndexSpec, plan_index

# Approximate types are held to what they reach on clustered data with their default
# query-time settings (measured: >= 0.99 here); exhaustive float16 is exact up to rounding.
MIN_RECALL = {"flat-fp16": 0.99, "flat-fp32": 0.999, "ivf-fp16": 0.95, "hnsw-fp16": 0.95}


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(seed, n, d, centers=40, spread=0.35, queries=0):
    """Unit vectors around random centres: neighbourhoods like real embeddings have (uniform
    random vectors have none, and no approximate index can beat a full scan on them).
    With ``queries``, also that many query vectors from the same centres."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d))
    x = _unit(c[rng.integers(0, centers, n + queries)] + spread * rng.standard_normal((n + queries, d)))
    return (x[:n], x[n:]) if queries else x


def _plan(n, index_type, **fields):
    return plan_index(n, IndexConfig(index_type=index_type, **fields))


def _recall(hits, exact_ids, k):
    return float(np.mean([len({h.chunk_id for h in row} & set(e[:k])) / k for row, e in zip(hits, exact_ids)]))


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_matches_exact_search_after_save_and_mapped_load(tmp_path, index_type):
    data, queries = clustered(0, 4000, 64, queries=100)
    spec = _plan(len(data), index_type)
    built = FaissIndex.build(data, spec)
    built.save(tmp_path)
    index = FaissIndex.load(tmp_path, IndexSpec.from_manifest(spec.to_manifest()), mmap=True)
    assert index.ntotal == 4000 and index.spec == spec
    exact = np.argsort(-(queries @ data.T), axis=1)
    hits = index.search(queries, 10)
    assert _recall(hits, exact, 10) >= MIN_RECALL[index_type]
    for row in hits:
        scores = [h.score for h in row]
        assert len(row) == 10 and scores == sorted(scores, reverse=True)
    # the mapped index answers exactly like the one built in memory
    assert [[h.chunk_id for h in r] for r in hits] == [[h.chunk_id for h in r] for r in built.search(queries, 10)]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_load_maps_the_file_instead_of_reading_it(tmp_path, index_type):
    data = clustered(2, 3000, 32)
    FaissIndex.build(data, _plan(len(data), index_type)).save(tmp_path)
    spec = _plan(len(data), index_type)
    mapped = FaissIndex.load(tmp_path, spec, mmap=True)
    assert _mapped(tmp_path / INDEX_FILE)
    del mapped
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / INDEX_FILE).write_bytes((tmp_path / INDEX_FILE).read_bytes())
    in_memory = FaissIndex.load(copy, spec, mmap=False)
    assert in_memory.ntotal == 3000 and not _mapped(copy / INDEX_FILE)


def test_sizes_are_float16(tmp_path):
    data = clustered(3, 2000, 384)
    sizes = {}
    for t in INDEX_TYPES:
        (tmp_path / t).mkdir()
        sizes[t] = FaissIndex.build(data, _plan(len(data), t)).save(tmp_path / t).stat().st_size / len(data)
    assert 768 <= sizes["flat-fp16"] < 768 + 4
    assert sizes["flat-fp32"] >= 1536
    assert 768 < sizes["ivf-fp16"] < 768 + 8 + 100  # codes, int64 ids, centroids
    assert 768 < sizes["hnsw-fp16"] < 768 + 2 * 32 * 4 + 200  # codes + graph links


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_k_above_ntotal_nan_and_zero_queries_give_only_real_finite_hits(index_type):
    data = clustered(4, 200, 16, centers=4)
    # IVF with 4 lists and 1 probe: a row comes back short of k and must be completed.
    spec = _plan(len(data), index_type, ivf_nlist=4, ivf_nprobe=1)
    index = FaissIndex.build(data, spec)
    q = np.vstack([data[0], np.full(16, np.nan, np.float32), np.zeros(16, np.float32),
                   np.r_[np.inf, np.zeros(15)].astype(np.float32)])
    rows = index.search(q, 500)
    assert len(rows[0]) == 200 and rows[0][0].chunk_id == 0
    assert len({h.chunk_id for h in rows[0]}) == 200  # every chunk once
    assert rows[1] == [] and rows[3] == []  # a non-finite query has no neighbours
    for row in rows:
        for h in row:
            assert 0 <= h.chunk_id < 200 and np.isfinite(h.score)
    assert index.search(np.zeros((0, 16), np.float32), 5) == []


def test_query_time_settings_change_results_without_rebuild(tmp_path):
    data, queries = clustered(5, 4000, 32, centers=200, spread=0.6, queries=50)
    spec = _plan(len(data), "ivf-fp16", ivf_nlist=64)
    FaissIndex.build(data, spec).save(tmp_path)
    exact = np.argsort(-(queries @ data.T), axis=1)
    narrow = FaissIndex.load(tmp_path, spec, nprobe=1)
    full = FaissIndex.load(tmp_path, spec, nprobe=64)
    assert narrow.search_params == {"nprobe": 1} and full.search_params == {"nprobe": 64}
    assert FaissIndex.load(tmp_path, spec).search_params == {"nprobe": spec.nprobe}
    assert _recall(narrow.search(queries, 10), exact, 10) < _recall(full.search(queries, 10), exact, 10)
    assert _recall(full.search(queries, 10), exact, 10) >= 0.99  # every list probed: exhaustive


def test_ivf_training_reports_progress_and_is_seeded():
    data = clustered(7, 3000, 32)
    spec = _plan(len(data), "ivf-fp16")
    log = []
    a = FaissIndex.build(data, spec, progress=lambda *e: log.append(e))
    b = FaissIndex.build(data, spec)
    train = [e for e in log if e[0] == "train"]
    assert train[0] == ("train", 1, 10) and train[-1] == ("train", 10, 10)
    assert log[-1] == ("add", 3000, 3000)
    assert [[h.chunk_id for h in r] for r in a.search(data[:20], 5)] == \
           [[h.chunk_id for h in r] for r in b.search(data[:20], 5)]


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_a_corrupted_mapped_file_is_refused_by_the_integrity_check(tmp_path, index_type):
    data = clustered(8, 1000, 32)
    spec = _plan(len(data), index_type)
    FaissIndex.build(data, spec).save(tmp_path)
    write_manifest(tmp_path, {"embedding": {"dim": 32}, "chunking": {}, "index": spec.to_manifest(), "counts": {}},
                   [INDEX_FILE])
    verify(tmp_path)
    raw = bytearray((tmp_path / INDEX_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the stored codes or lists
    (tmp_path / INDEX_FILE).write_bytes(bytes(raw))
    with pytest.raises(IndexIntegrityError, match="index.faiss: altered"):
        verify(tmp_path)


def test_wrong_dimension_and_unplanned_types_are_refused():
    index = FaissIndex.build(clustered(9, 50, 16), "flat-fp16")
    with pytest.raises(ValueError, match=r"\(n, 16\)"):
        index.search(np.zeros((1, 8), np.float32), 3)
    with pytest.raises(ValueError, match="plan_index"):
        FaissIndex.build(clustered(9, 50, 16), "ivf-fp16")
    assert not hasattr(index, "add")  # a loaded index is read-only: rebuild instead


def test_single_query_runs_on_one_thread_and_restores_the_setting():
    import faiss

    index = FaissIndex.build(clustered(10, 500, 16), "flat-fp16")
    before = faiss.omp_get_max_threads()
    index.search(clustered(11, 1, 16), 5)
    index.search(clustered(11, 40, 16), 5)
    assert faiss.omp_get_max_threads() == before
