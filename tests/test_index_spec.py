import pytest

from ragserve.config import IndexConfig
from ragserve.errors import ConfigError
from ragserve.retrieval.index_spec import (
    AUTO_FLAT_MAX,
    AUTO_HNSW_MAX,
    IndexSpec,
    choose_index_type,
    choose_nlist,
    default_nprobe,
    plan_index,
)


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, "flat-fp16"), (AUTO_FLAT_MAX, "flat-fp16"), (AUTO_FLAT_MAX + 1, "hnsw-fp16"),
     (AUTO_HNSW_MAX, "hnsw-fp16"), (AUTO_HNSW_MAX + 1, "ivf-fp16")],
)
def test_auto_picks_by_corpus_size_and_says_why(n, expected):
    index_type, reason = choose_index_type(n)
    assert index_type == expected
    assert str(n) in reason
    spec = plan_index(n, IndexConfig(index_type="auto"))
    assert spec.index_type == expected and spec.reason == reason
    assert spec.to_manifest()["auto"] == reason and spec.to_manifest()["requested"]["index_type"] == "auto"


def test_nlist_is_about_four_sqrt_n_with_enough_training_points():
    assert choose_nlist(1_000_000) == 4000
    assert choose_nlist(10_000) == 256  # 4·100 = 400 would leave 25 points per list; 10000 // 39 = 256
    assert choose_nlist(100) == 2
    assert choose_nlist(10) == 1
    assert choose_nlist(10**12) == 65_536
    assert default_nprobe(4000) == 63 and default_nprobe(100) == 16 and default_nprobe(4) == 4


def test_plan_fills_defaults_and_keeps_explicit_values():
    ivf = plan_index(1_000_000, IndexConfig(index_type="ivf-fp16"))
    assert ivf.factory == "IVF4000,SQfp16"
    assert ivf.params == {"nlist": 4000, "train_size": 256_000, "nprobe": 63}
    ivf = plan_index(1_000_000, IndexConfig(index_type="ivf-fp16", ivf_nlist=1024, ivf_nprobe=32))
    assert ivf.params == {"nlist": 1024, "train_size": 65_536, "nprobe": 32}
    hnsw = plan_index(1000, IndexConfig(index_type="hnsw-fp16", hnsw_m=16, hnsw_ef_construction=100))
    assert hnsw.factory == "HNSW16,SQfp16"
    assert hnsw.params == {"m": 16, "ef_construction": 100, "ef_search": 128}
    assert plan_index(5, IndexConfig(index_type="flat-fp32")).factory == "Flat"
    with pytest.raises(ConfigError, match="index.ivf_nlist"):
        plan_index(100, IndexConfig(index_type="ivf-fp16", ivf_nlist=500))


def test_manifest_round_trip():
    spec = plan_index(300_000, IndexConfig())
    assert IndexSpec.from_manifest(spec.to_manifest()) == spec
    # manifests written before index parameters existed still load
    assert IndexSpec.from_manifest({"type": "flat-fp16", "faiss": "SQfp16"}) == IndexSpec("flat-fp16")
    with pytest.raises(ValueError, match="index_type must be one of"):
        IndexSpec("annoy")
