import numpy as np
import pytest

from ragserve.index import FaissIndex


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("index_type", ["flat-fp16", "flat-fp32"])
def test_matches_exact_search_after_save_and_mapped_load(tmp_path, index_type):
    rng = np.random.default_rng(0)
    data, queries = _unit(rng, 2000, 64), _unit(rng, 50, 64)
    FaissIndex.build(data, index_type).save(tmp_path)
    index = FaissIndex.load(tmp_path, index_type, mmap=True)
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    hits = index.search(queries, 10)
    recall = np.mean([len({h.chunk_id for h in row} & set(e)) / 10 for row, e in zip(hits, exact)])
    assert recall >= 0.99
    for row in hits:
        scores = [h.score for h in row]
        assert scores == sorted(scores, reverse=True)


def test_fp16_is_half_the_size_of_fp32(tmp_path):
    data = _unit(np.random.default_rng(1), 1000, 384)
    sizes = {}
    for t in ("flat-fp16", "flat-fp32"):
        (tmp_path / t).mkdir()
        sizes[t] = FaissIndex.build(data, t).save(tmp_path / t).stat().st_size
    assert sizes["flat-fp16"] < 1000 * 384 * 2 + 4096
    assert sizes["flat-fp32"] >= 1000 * 384 * 4


def test_k_above_ntotal_nan_and_zero_queries_give_only_real_finite_hits():
    data = _unit(np.random.default_rng(2), 5, 16)
    index = FaissIndex.build(data, "flat-fp16")
    q = np.vstack([data[0], np.full(16, np.nan, np.float32), np.zeros(16, np.float32)])
    rows = index.search(q, 50)
    assert len(rows[0]) == 5 and rows[0][0].chunk_id == 0
    for row in rows:
        for h in row:
            assert 0 <= h.chunk_id < 5 and np.isfinite(h.score)


def test_wrong_dimension_is_refused():
    index = FaissIndex.build(_unit(np.random.default_rng(3), 5, 16), "flat-fp16")
    with pytest.raises(ValueError, match=r"\(n, 16\)"):
        index.search(np.zeros((1, 8), np.float32), 3)
