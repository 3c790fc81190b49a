"""Index folders whose files agree with the manifest's hashes but not with each other are
refused when opened and by verify-index (real FAISS files, real docstores)."""

import shutil

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from ragserve.cli.main import app
from ragserve.config import IndexConfig
from ragserve.errors import IndexIntegrityError
from ragserve.index.manifest import MANIFEST_FILE, read_manifest, write_manifest
from ragserve.index.structure import check_structure
from ragserve.index.verify import verify
from ragserve.retrieval.docstore import CHUNKS_FILE, OFFSETS_FILE, write_docstore
from ragserve.retrieval.faiss_index import INDEX_FILE, FaissIndex
from ragserve.retrieval.index_spec import IndexSpec, plan_index
from ragserve.types import Chunk

N, DIM = 40, 8


def _vectors(n, dim, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reseal(folder, **changes):
    """Rewrite the manifest so its hashes (and fingerprint) match whatever the files now are:
    what a careless tool or a hostile one can do."""
    body = orjson.loads((folder / MANIFEST_FILE).read_bytes())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        body[section][key] = value
    files = list(body.pop("files"))
    body.pop("fingerprint")
    write_manifest(folder, body, files)


def make_index(folder, index_type="flat-fp16", n=N, dim=DIM, vectors=None, normalized=None):
    folder.mkdir(parents=True, exist_ok=True)
    spec = plan_index(n, IndexConfig(index_type=index_type))
    index = FaissIndex.build(_vectors(n, dim) if vectors is None else vectors, spec)
    index.save(folder)
    write_docstore(folder, (Chunk(i, f"d{i}.txt", f"chunk {i}\nsecond line") for i in range(n)))
    embedding = {"name": "m", "identity": "x", "dim": dim}
    if normalized is not None:
        embedding["normalized"] = normalized
    body = {"embedding": embedding, "chunking": {},
            "index": {**spec.to_manifest(), "ntotal": n}, "counts": {"chunks": n}}
    write_manifest(folder, body, [INDEX_FILE, CHUNKS_FILE, OFFSETS_FILE])
    return folder


@pytest.mark.parametrize("index_type", ["flat-fp16", "flat-fp32", "hnsw-fp16"])
def test_a_consistent_folder_passes_and_says_what_it_checked(tmp_path, index_type):
    report = check_structure(verify(make_index(tmp_path / "i", index_type)))
    assert (report.index_type, report.dim, report.vectors, report.chunks) == (index_type, DIM, N, N)


def test_ivf_lists_are_checked_against_the_manifest(tmp_path):
    folder = make_index(tmp_path / "i", "ivf-fp16", n=2000)
    nlist = check_structure(verify(folder)).nlist
    assert nlist == read_manifest(folder).data["index"]["params"]["nlist"] > 1
    body = read_manifest(folder).data
    _reseal(folder, **{"index.params": {**body["index"]["params"], "nlist": nlist + 1}})
    with pytest.raises(IndexIntegrityError, match=f"{nlist} inverted lists; the manifest says {nlist + 1}"):
        verify(folder)


def _swap_index(folder, index_type="flat-fp16", n=N, dim=DIM, metric=None):
    if metric is None:
        FaissIndex.build(_vectors(n, dim, seed=1), plan_index(n, IndexConfig(index_type=index_type))).save(folder)
    else:
        import faiss

        index = faiss.index_factory(dim, "SQfp16", metric)
        index.add(_vectors(n, dim, seed=1))
        faiss.write_index(index, str(folder / INDEX_FILE))
    _reseal(folder)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda f: _swap_index(f, dim=DIM * 2), "holds 16-d vectors; the manifest says 8-d"),
    (lambda f: _swap_index(f, n=2 * N), f"holds {2 * N} vectors; the manifest and docstore say {N}"),
    (lambda f: _swap_index(f, "flat-fp32"), "holds a flat-fp32 index; the manifest says flat-fp16"),
    (lambda f: _swap_index(f, metric=1), "metric 1, not inner product"),
    # the manifest "agrees" with a doubled index, but the docstore does not
    (lambda f: (_swap_index(f, n=2 * N), _reseal(f, **{"counts.chunks": 2 * N, "index.ntotal": 2 * N})),
     f"describes {N} chunks; the manifest and index say {2 * N}"),
    (lambda f: _reseal(f, **{"index.ntotal": N + 1}), f"index.ntotal {N + 1} differs from counts.chunks {N}"),
    (lambda f: _reseal(f, **{"index.type": "ivf-fp99"}), "unknown index type 'ivf-fp99'"),
    (lambda f: _reseal(f, **{"embedding.dim": "8"}), "embedding.dim must be a non-negative integer"),
])
def test_files_that_disagree_with_each_other_are_refused(tmp_path, damage, message):
    folder = make_index(tmp_path / "i")
    damage(folder)
    with pytest.raises(IndexIntegrityError, match=message):
        verify(folder)


def _shift_one_offset(folder):
    offsets = np.load(folder / OFFSETS_FILE)
    offsets[5] += 3  # still increasing, still ending at the file size: only the lines disagree
    np.save(folder / OFFSETS_FILE, offsets, allow_pickle=False)
    _reseal(folder)


def _float_offsets(folder):
    np.save(folder / OFFSETS_FILE, np.load(folder / OFFSETS_FILE).astype(np.float64), allow_pickle=False)
    _reseal(folder)


def _unlisted_offsets(folder):
    body = orjson.loads((folder / MANIFEST_FILE).read_bytes())
    body.pop("fingerprint")
    files = [f for f in body.pop("files") if f != OFFSETS_FILE]
    write_manifest(folder, body, files)


@pytest.mark.parametrize(("damage", "message"), [
    (_shift_one_offset, "chunk 4 does not end at a line end"),
    (_float_offsets, "expected a 1-d uint64 array"),
    (_unlisted_offsets, "does not list chunks.offsets.npy"),  # present, so it would be opened unhashed
])
def test_a_docstore_that_disagrees_with_itself_is_refused(tmp_path, damage, message):
    folder = make_index(tmp_path / "i")
    damage(folder)
    with pytest.raises(IndexIntegrityError, match=message):
        verify(folder)


def test_verify_index_reports_the_structure_and_fails_on_a_mismatch(tmp_path):
    folder = make_index(tmp_path / "i")
    r = CliRunner().invoke(app, ["verify-index", str(folder)])
    assert r.exit_code == 0, r.output
    assert f"structure agrees: flat-fp16 (IxSQ), {DIM}-d, inner product, {N} vectors = {N} docstore lines" in r.output
    assert "contents agree: no record twice" in r.output  # no corpus recorded: no ranges to check
    assert f"vectors checked: all {N}: finite, not all zero" in r.output
    _swap_index(folder, dim=DIM * 2)
    r = CliRunner().invoke(app, ["verify-index", str(folder)])
    assert r.exit_code == 1 and "[index]" in r.output and "holds 16-d vectors" in r.output


@pytest.mark.parametrize("index_type", ["flat-fp16", "flat-fp32", "hnsw-fp16", "ivf-fp16"])
def test_vectors_are_sampled_in_place_at_open_and_all_read_by_verify_index(tmp_path, index_type):
    from ragserve.index.contents import SAMPLE
    from ragserve.index.verify import check_index

    n = 2000
    x = _vectors(n, DIM)
    good = make_index(tmp_path / "good", index_type, n=n, vectors=x, normalized=True)
    index = FaissIndex.load(good, IndexSpec.from_manifest(read_manifest(good).data["index"]))
    ids, sample = index.sample(SAMPLE)
    assert len(ids) == SAMPLE and len(set(ids.tolist())) == SAMPLE and ids.max() > n // 2  # spread over the index
    assert np.allclose(sample, x[ids], atol=2e-3)  # float16 codes decoded in place (IVF: residual + centroid)
    assert check_index(good).vectors.checked == SAMPLE
    assert check_index(good, vectors="all").vectors.checked == n

    half = make_index(tmp_path / "half", index_type, n=n, vectors=x * 0.5, normalized=True)
    with pytest.raises(IndexIntegrityError, match=r"has norm 0.500 .* sampled are not of unit norm"):
        verify(half)
    make_index(tmp_path / "raw", index_type, n=n, vectors=x * 0.5)  # not said to be normalized: served
    assert verify(tmp_path / "raw", vectors="all")

    # One vector the sample does not read: opening reads a sample, verify-index every vector.
    # (IVF: the same centroids, so that every other vector keeps its place in its list.)
    missed = next(i for i in range(n) if i not in set(ids.tolist()))
    x[missed] *= 3
    one = tmp_path / "one"
    shutil.copytree(good, one)
    FaissIndex.build(x, index.spec, centroids=index.centroids()).save(one)
    _reseal(one)
    assert verify(one)
    with pytest.raises(IndexIntegrityError, match=f"the vector of chunk {missed} has norm 3.00\\d .1 of {n} read"):
        verify(one, vectors="all")


def test_a_docstore_record_twice_is_refused_but_equal_texts_of_two_files_are_not(tmp_path):
    folder = make_index(tmp_path / "i")
    lines = (folder / CHUNKS_FILE).read_bytes().splitlines(keepends=True)
    same_text = [orjson.dumps({**orjson.loads(x), "text": "the same text"}) + b"\n" for x in lines]
    (folder / CHUNKS_FILE).write_bytes(b"".join(same_text))
    np.save(folder / OFFSETS_FILE, np.cumsum([0] + [len(x) for x in same_text]).astype(np.uint64))
    _reseal(folder)
    assert verify(folder)  # every record names its own doc
    same_text[7] = same_text[6]
    (folder / CHUNKS_FILE).write_bytes(b"".join(same_text))
    np.save(folder / OFFSETS_FILE, np.cumsum([0] + [len(x) for x in same_text]).astype(np.uint64))
    _reseal(folder)
    with pytest.raises(IndexIntegrityError, match="chunks 6 and 7 are the same record .doc 'd6.txt'."):
        verify(folder)


@pytest.mark.integration
def test_opening_a_resealed_real_index_fails_before_serving(tmp_path, xquad_index, embedder):
    from ragserve import RAG

    folder = tmp_path / "x"
    shutil.copytree(xquad_index, folder)
    chunks = read_manifest(folder).data["counts"]["chunks"]
    _swap_index(folder, n=2 * chunks, dim=384)  # a valid 384-d index with twice the vectors
    with pytest.raises(IndexIntegrityError, match=f"holds {2 * chunks} vectors"):
        RAG.from_index(folder, start_engine=False, embedder=embedder)
    r = CliRunner().invoke(app, ["verify-index", str(folder)])
    assert r.exit_code == 1
