"""Sharded indexes on real components (MiniLM, FAISS, versioned folders; the fake generator
where an answer is asked): builds, the structural refusals, the merged search against one
index, incremental builds that touch only the changed shards, reload of every shard at once.

The embedder is the session's, wrapped in a memo of whole embedding calls (``replay_embedder``,
``ragserve.testing.embedders``): full builds of the same corpus embed the very same slices
(``embed_slices``), so each distinct slice is embedded once for the whole session (the vectors
are the model's, the suite just pays for them once)."""

import os
import shutil

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from ragserve.build.builder import build_index
from ragserve.build.sharded import build_sharded
from ragserve.cli.app import app
from ragserve.config import RAGConfig
from ragserve.engine.served import open_index
from ragserve.errors import ConfigError, IndexIntegrityError, ShardError
from ragserve.index.manifest import fingerprint, read_manifest, sha256_file
from ragserve.index.shards import shard_name, shard_of
from ragserve.index.verify import check_index, verify
from ragserve.rag import RAG
from ragserve.retrieval.faiss_index import FaissIndex
from ragserve.retrieval.index_spec import IndexSpec
from ragserve.retrieval.sharded import merge_top_k
from ragserve.testing.fakes import FakeGenerator
from ragserve.types import Hit

pytestmark = pytest.mark.integration
IVF = {"index_type": "ivf-fp16", "ivf_nlist": 4, "ivf_nprobe": 2}


@pytest.fixture(scope="module")
def memo(replay_embedder):
    return replay_embedder


@pytest.fixture(scope="module")
def built(tmp_path_factory, xquad_corpus, memo):
    """One flat index and sharded ones (2 and 4 shards) of the XQuAD corpus."""
    root = tmp_path_factory.mktemp("shards")
    src = xquad_corpus[0]
    out = {"single": root / "single"}
    build_index(src, out["single"], RAGConfig(), embedder=memo)
    for n in (2, 4):
        out[n] = root / f"sharded{n}"
        build_sharded(src, out[n], RAGConfig(), shards=n, embedder=memo)
    return out


def test_a_sharded_build_holds_the_single_builds_chunks_each_file_in_its_shard(built):
    single = all_chunks_real(built["single"])
    for n in (2, 4):
        checked = check_index(built[n], vectors="all")
        top = checked.manifest
        assert [s["name"] for s in top.data["shards"]] == [shard_name(i) for i in range(n)]
        assert sorted(all_chunks_real(built[n])) == sorted(single)
        for i, shard in enumerate(checked.shards):
            assert shard.manifest.fingerprint == top.data["shards"][i]["fingerprint"]
            assert {shard_of(d, n) for d in shard.manifest.data["corpus"]["files"]} == {i}
        # the top fingerprint covers every shard: each shard's manifest is hashed in the top's files
        assert set(top.data["files"]) == {f"{shard_name(i)}/manifest.json" for i in range(n)}
        assert top.data["counts"]["chunks"] == len(single)


def all_chunks_real(index_dir):
    top = read_manifest(index_dir)
    folders = [top.folder / s["name"] for s in top.data["shards"]] if "shards" in top.data else [top.folder]
    from ragserve.retrieval.docstore import LazyDocStore

    out = []
    for folder in folders:
        store = LazyDocStore(folder)
        out += [(c.doc_id, c.text) for c in store.get_many(range(len(store)))]
        store.close()
    return out


def _top10(rag, question):
    return [(s.doc_id, s.text, s.score) for s in rag.retrieve(question, 10)]


def test_flat_shards_give_the_single_indexs_top10_exactly(built, xquad_corpus, memo):
    questions = [q["question"] for q in xquad_corpus[1]][:60]
    opened = {
        k: RAG.from_index(v, RAGConfig(), embedder=memo, generator=FakeGenerator()) for k, v in built.items()
    }
    try:
        vectors = memo.inner.encode(questions)
        single = opened["single"].index.search(vectors, 10)
        for n in (2, 4):
            sharded = opened[n].index.search(vectors, 10)
            for q, a, b in zip(questions, single, sharded, strict=True):
                docs_a = [opened["single"].docstore.get_many([h.chunk_id])[0].text for h in a]
                docs_b = [opened[n].docstore.get_many([h.chunk_id])[0].text for h in b]
                assert docs_a == docs_b, q
                assert [h.score for h in a] == [h.score for h in b], q  # same fp16 codes: same scores
            # and through the engine: retriever, micro-batcher, docstore lookups per shard
            for q in questions[:5]:
                assert _top10(opened[n], q) == _top10(opened["single"], q)
    finally:
        for rag in opened.values():
            rag.close()


def test_merge_keeps_the_k_best_by_score_then_global_id():
    hits = merge_top_k([[Hit(0, 0.9), Hit(1, 0.5)], [Hit(0, 0.9), Hit(1, 0.7)]], np.array([0, 2, 4]), 3)
    assert hits == [Hit(0, 0.9), Hit(2, 0.9), Hit(3, 0.7)]


def test_ivf_shards_share_one_quantizer_and_recall_the_single_ivf_index(tmp_path, xquad_corpus, memo):
    cfg = RAGConfig().replace(index=IVF)
    single, sharded = tmp_path / "ivf", tmp_path / "ivf2"
    build_index(xquad_corpus[0], single, cfg, embedder=memo)
    report = build_sharded(xquad_corpus[0], sharded, cfg, shards=2, embedder=memo)
    assert report.quantizer["action"] == "trained"
    top = check_index(sharded, vectors="all")
    centroids = [
        FaissIndex.load(s.manifest.folder, IndexSpec.from_manifest(s.manifest.data["index"])).centroids()
        for s in top.shards
    ]
    assert np.array_equal(centroids[0], centroids[1])
    _, a, store_a = open_index(single, cfg, memo)
    _, b, store_b = open_index(sharded, cfg, memo)
    vectors = memo.inner.encode([q["question"] for q in xquad_corpus[1]][:60])
    found = total = 0
    for ra, rb in zip(a.search(vectors, 10), b.search(vectors, 10), strict=True):
        want = {store_a.get(h.chunk_id).text for h in ra}
        found += len(want & {store_b.get(h.chunk_id).text for h in rb})
        total += len(want)
    assert found / total >= 0.99, found / total
    b.close()


@pytest.fixture
def small(tmp_path, xquad_corpus):
    src = tmp_path / "src"
    src.mkdir()
    for f in sorted(xquad_corpus[0].glob("*.txt"))[:12]:
        shutil.copy(f, src / f.name)
    return src


def test_an_incremental_build_rewrites_only_the_changed_shard(tmp_path, small, memo):
    out = tmp_path / "idx"
    first = build_sharded(small, out, RAGConfig(), shards=3, embedder=memo)
    before = read_manifest(out)
    changed = sorted(small.glob("*.txt"))[0]
    changed.write_text(changed.read_text("utf-8") + " The shard archive moved in 2031.", encoding="utf-8")
    n = shard_of(changed.name, 3)
    second = build_sharded(small, out, RAGConfig(), shards=3, embedder=memo)
    after = read_manifest(out)
    assert second.mode == "incremental" and second.changes["changed"] == 1
    record = read_manifest(after.folder / shard_name(n)).data["corpus"]["files"][changed.name]
    assert second.embedded == record["chunks"]  # only the changed file's chunks were embedded
    assert [s["action"] for s in second.shards] == ["rebuilt" if i == n else "linked" for i in range(3)]
    for i in range(3):
        old, new = before.folder / shard_name(i), after.folder / shard_name(i)
        same = before.data["shards"][i]["fingerprint"] == after.data["shards"][i]["fingerprint"]
        assert same == (i != n)
        if i != n:  # the very same files: hard links, nothing rewritten
            assert (old / "index.faiss").stat().st_ino == (new / "index.faiss").stat().st_ino
    assert after.fingerprint != first.fingerprint
    verify(out)
    # nothing changed: no new version
    assert build_sharded(small, out, RAGConfig(), shards=3, embedder=memo).mode == "up to date"
    # another shard count: every shard is built again, and the reason says why
    again = build_sharded(small, out, RAGConfig(), shards=2, embedder=memo)
    assert again.mode == "full" and "shard count changed" in again.reason


def _rewrite(manifest_path, change):
    data = orjson.loads(manifest_path.read_bytes())
    change(data)
    data["fingerprint"] = fingerprint(data)
    manifest_path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return data


def _relist(top_folder, shard, shard_fp):
    """Make the top manifest vouch for a rewritten shard manifest (hash and fingerprint)."""

    def change(data):
        data["files"][f"{shard}/manifest.json"] = {
            "sha256": sha256_file(top_folder / shard / "manifest.json"),
            "bytes": (top_folder / shard / "manifest.json").stat().st_size,
        }
        for s in data["shards"]:
            if s["name"] == shard:
                s["fingerprint"] = shard_fp

    _rewrite(top_folder / "manifest.json", change)


def test_a_broken_shard_set_is_refused_naming_the_shard(tmp_path, small, memo):
    out = tmp_path / "idx"
    old = read_manifest(build_sharded(small, out, RAGConfig(), shards=3, embedder=memo).version)
    (small / "extra.txt").write_text("An extra paragraph for another build of the index.", encoding="utf-8")
    build_sharded(small, out, RAGConfig(), shards=3, embedder=memo)  # incremental: one shard rebuilt
    folder = read_manifest(out).folder
    victim = shard_name(shard_of("extra.txt", 3))

    # a shard of another build (mixed fingerprints): the previous version's, kept beside it
    keep = tmp_path / "keep"
    shutil.move(folder / victim, keep)
    shutil.copytree(old.folder / victim, folder / victim)
    with pytest.raises(ShardError, match=f"shard {victim}: fingerprint .* another build") as e:
        verify(out)
    assert e.value.shard == victim
    with pytest.raises(ShardError, match=victim):
        open_index(out, RAGConfig(), memo)

    # a missing shard
    shutil.rmtree(folder / victim)
    with pytest.raises(ShardError, match=f"shard {victim}: missing"):
        verify(out)
    shutil.move(keep, folder / victim)
    verify(out)

    # a shard of another dimension, whose manifests were re-hashed to match
    data = _rewrite(folder / victim / "manifest.json", lambda d: d["embedding"].update(dim=768))
    _relist(folder, victim, data["fingerprint"])
    with pytest.raises(ShardError, match=f"shard {victim}: .*768-d") as e:
        verify(out)
    assert isinstance(e.value, IndexIntegrityError)
    # and the incremental build refuses it too, naming the shard, and changes nothing
    with pytest.raises(ShardError, match=victim):
        build_sharded(small, out, RAGConfig(), shards=3, embedder=memo)


def test_reload_flips_every_shard_together(tmp_path, small, memo):
    out = tmp_path / "idx"
    v1 = build_sharded(small, out, RAGConfig(), shards=3, embedder=memo)
    with RAG.from_index(out, RAGConfig(), embedder=memo, generator=FakeGenerator()) as rag:
        held = rag.served.acquire()
        (small / "zebra.txt").write_text(
            "The zebra archive of the shard museum opened in 2031.", encoding="utf-8"
        )
        v2 = build_sharded(small, out, RAGConfig(), shards=3, embedder=memo)
        rag.reload()
        assert rag.fingerprint == v2.fingerprint != v1.fingerprint
        top = rag.retrieve("When did the zebra archive of the shard museum open?", 1)[0]
        assert top.doc_id == "zebra.txt"
        # the snapshot held across the reload still reads the old version of every shard
        assert held.fingerprint == v1.fingerprint
        assert all(str(held.manifest.folder) in str(s.folder) for s in held.docstore.stores)
        assert "zebra.txt" not in {c.doc_id for c in held.docstore.get_many(range(len(held.docstore)))}
        rag.served.release(held)
        assert rag.query("When did the zebra archive open?").index_fingerprint == v2.fingerprint


def test_index_shards_config_builds_in_shards_and_the_cli_verifies_them(tmp_path, small, memo):
    out = tmp_path / "cli"
    cfg = RAGConfig().replace(index={"shards": 2})
    with pytest.raises(ConfigError, match="build_sharded"):
        build_index(small, out, cfg, embedder=memo)  # never silently unsharded
    report = build_sharded(small, out, cfg, embedder=memo)
    assert [s["name"] for s in report.shards] == ["shard-000", "shard-001"]
    assert os.path.islink(out)
    verified = CliRunner().invoke(app, ["verify-index", str(out)])
    assert verified.exit_code == 0 and "shard-000: chunks 0–" in verified.output, verified.output
    assert "vectors checked: all" in verified.output
    bad = CliRunner().invoke(
        app, ["build-index", str(small), "--out", str(out), "--shards", "2", "--dry-run"]
    )
    assert bad.exit_code != 0 and "sharded" in bad.output
    with pytest.raises(ConfigError, match="index.shards"):
        RAGConfig().replace(index={"shards": -1})
