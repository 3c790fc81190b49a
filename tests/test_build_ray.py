"""``build-index --ray``: the index a local build writes, read, chunked and embedded on the
session's local Ray cluster (``ray_cluster``), on the XQuAD slice with real MiniLM.

The error paths (ray missing, an address where nothing listens) are unit tests: they
must fail before any work, so they need no cluster.
"""

from __future__ import annotations

import shutil
import socket
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from ragserve.build.builder import build_index
from ragserve.cli.main import app
from ragserve.config import RAGConfig
from ragserve.errors import ClusterError
from ragserve.testing.fakes import CountingEmbedder
from ragserve.testing.waits import CLUSTER_WAIT_S, eventually

from .test_incremental import _edit, _open, _same_ranking

# Slices of 32 chunks (embed.batch_size * 8): the ~40 chunks of the slice go to two actors
# in two slices, so Ray Data's out-of-order rows are put back in order.
SMALL_BATCHES = RAGConfig().replace(embed={"batch_size": 4})
FINE_SLICES = RAGConfig().replace(embed={"batch_size": 1})  # slices of 8 chunks
QUESTIONS = 6


def _manifest_body(m):
    return {k: v for k, v in m.data.items() if k != "created_at"}


def _cpus_free_again(ray, cpus=2, wait_s=CLUSTER_WAIT_S):
    """True once every CPU of the cluster is free again: the build's actors were stopped.
    Ray's resource view lags an actor's exit (seconds on a busy machine), so this polls it
    for up to ``wait_s``; past that, an AssertionError with the last view."""
    return eventually(lambda: ray.available_resources().get("CPU", 0) >= cpus, wait_s, 0.2,
                      f"{cpus} free CPUs in Ray's resource view")


@pytest.fixture(scope="module")
def built(tmp_path_factory, xquad_corpus, embedder, ray_cluster):
    """The slice plus a binary file and an unsupported one, built locally and on Ray."""
    from ragserve.ray.build import build_index_ray

    root = tmp_path_factory.mktemp("ray-build")
    src = root / "src"
    shutil.copytree(xquad_corpus[0], src)
    (src / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (src / "table.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    local = build_index(src, root / "local", SMALL_BATCHES, embedder=embedder)
    on_ray = build_index_ray(src, root / "ray", SMALL_BATCHES, embedder=embedder, actors=2)
    return root, src, local, on_ray


@pytest.mark.ray
def test_ray_build_gives_the_local_build_chunks_manifest_and_results(built, xquad_corpus, embedder):
    root, _, local, on_ray = built
    m_local, index_local, store_local = _open(root / "local")
    m_ray, index_ray, store_ray = _open(root / "ray")
    chunks_local = store_local.get_many(range(len(store_local)))
    chunks_ray = store_ray.get_many(range(len(store_ray)))
    assert len(chunks_ray) == on_ray.chunks == local.chunks > 32
    assert [(c.chunk_id, c.doc_id, c.text, c.metadata) for c in chunks_ray] == [
        (c.chunk_id, c.doc_id, c.text, c.metadata) for c in chunks_local]
    # Every fingerprint input is the local build's: embedding, chunking, index, counts, the
    # per-file corpus record, the skipped files, and every file's hash (same slices, same
    # float16 codes). The build section (not hashed) is equal too: both were full builds.
    assert _manifest_body(m_ray) == _manifest_body(m_local)
    assert on_ray.fingerprint == local.fingerprint
    # Files that cannot be read are reported as the local build reports them.
    assert [(f.path, f.reason) for f in on_ray.skipped] == [(f.path, f.reason) for f in local.skipped]
    assert {f.path for f in on_ray.skipped} == {"binary.txt", "table.csv"}

    asked = xquad_corpus[1][:: len(xquad_corpus[1]) // QUESTIONS]
    questions = embedder.encode([q["question"] for q in asked])
    for a, b in zip(index_ray.search(questions, 10), index_local.search(questions, 10)):
        assert [h.chunk_id for h in a] == [h.chunk_id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-3)
    store_local.close()
    store_ray.close()


@pytest.mark.ray
def test_ray_build_reports_the_cluster_and_each_actor(built):
    *_, on_ray = built
    c = on_ray.cluster
    assert c["how"] == "this process's connection" and c["cpus"] == 2 and c["nodes"] == 1
    assert c["files_read"] == on_ray.files_read + len(on_ray.skipped) and c["read_tasks"] >= 2
    assert c["actors"] == 2 and sum(a["chunks"] for a in c["per_actor"]) == on_ray.embedded == on_ray.chunks
    assert all(a["chunks"] > 0 and a["chunks_per_s"] > 0 for a in c["per_actor"])
    assert [a["actor"] for a in c["per_actor"]] == list(range(len(c["per_actor"])))
    assert all(a["load_s"] > 0 and a["pid"] > 0 and a["node"] for a in c["per_actor"])
    assert {"ray_start", "read", "actors", "embed", "index", "write"} <= set(on_ray.seconds)
    assert 0 < on_ray.seconds["actors"] < on_ray.seconds["embed"]
    assert _cpus_free_again(sys.modules["ray"])  # Ray Data stopped the actors when the dataset was done


@pytest.mark.ray
def test_ray_build_is_incremental_and_sends_only_changed_files(built, tmp_path, embedder):
    from ragserve.ray.build import build_index_ray

    _, src_built, *_ = built
    src = tmp_path / "src"
    shutil.copytree(src_built, src)
    out = tmp_path / "idx"
    build_index_ray(src, out, SMALL_BATCHES, embedder=embedder)
    changed, deleted, added = _edit(src)

    report = build_index_ray(src, out, SMALL_BATCHES, embedder=(counter := CountingEmbedder(embedder)))
    assert report.mode == "incremental" and report.changes["changed"] == report.changes["added"] == 1
    # Sent to the cluster: the changed and added files, and the two skipped last time (read
    # again, as a local build does: the reason may be gone). Actors embed, not the driver.
    assert report.cluster["files_read"] == 4 and counter.texts == []
    m, inc_index, inc_store = _open(out)
    assert report.embedded == sum(m.data["corpus"]["files"][f]["chunks"] for f in (changed, added))
    assert sum(a["chunks"] for a in report.cluster["per_actor"]) == report.embedded

    full = build_index(src, tmp_path / "full", SMALL_BATCHES, embedder=embedder)
    m_full, full_index, full_store = _open(tmp_path / "full")
    assert full.chunks == report.chunks and deleted not in m.data["corpus"]["files"]
    assert [(c.doc_id, c.text, c.metadata) for c in inc_store.get_many(range(len(inc_store)))] == [
        (c.doc_id, c.text, c.metadata) for c in full_store.get_many(range(len(full_store)))]
    for key in ("embedding", "chunking", "index", "counts", "corpus", "skipped"):
        assert m.data[key] == m_full.data[key], key
    # The changed file was embedded in other slices than in a full build: vectors agree to rounding.
    questions = embedder.encode(["When was the river renamed?", "Who won Super Bowl 50?"])
    for a, b in zip(inc_index.search(questions, 10), full_index.search(questions, 10)):
        assert _same_ranking(a, b)
    inc_store.close()
    full_store.close()


@pytest.mark.ray
def test_cli_build_index_ray_writes_the_local_index(tmp_path, xquad_corpus, xquad_index, ray_cluster,
                                                    capfd):
    from ragserve.index.verify import verify

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["build-index", str(xquad_corpus[0]), "--out", str(out), "--ray",
                                      "--ray-actors", "1"])
    assert result.exit_code == 0, result.output
    assert "ray: this process's connection" in result.output and "actor 0 on" in result.output
    # Ray Data's progress bars, banners and warnings stay out of the CLI's output.
    printed = result.output + "".join(capfd.readouterr())
    for noise in ("Dataset", "execution finished", "Progress bars", "core_worker", "deprecated"):
        assert noise not in printed, noise
    assert verify(out).fingerprint == verify(xquad_index).fingerprint  # the session's local build


def test_missing_ray_names_the_extra_before_any_work(tmp_path, monkeypatch):
    from ragserve.ray.build import build_index_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ClusterError, match=r"pip install ragserve\[ray\]"):
        build_index_ray(tmp_path / "no-such-source", tmp_path / "out")  # fails before the source is looked at
    result = CliRunner().invoke(app, ["build-index", str(tmp_path), "--out", str(tmp_path / "out"), "--ray"])
    assert result.exit_code == 1 and "pip install ragserve[ray]" in result.output
    assert not (tmp_path / "out").exists()


def test_an_unreachable_or_malformed_address_fails_fast(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from ragserve.ray.build import build_index_ray

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    with pytest.raises(ClusterError, match=f"cannot reach a Ray cluster at 127.0.0.1:{port}"):
        build_index_ray(tmp_path, tmp_path / "out", address=f"127.0.0.1:{port}")
    # ray.init alone retries such an address for over a minute; the probe is refused at once
    # (30 s: a bound a loaded machine cannot reach by accident, far below that minute)
    assert time.perf_counter() - t < 30
    with pytest.raises(ClusterError, match="not HOST:PORT"):
        build_index_ray(tmp_path, tmp_path / "out", address="nonsense")
    if not sys.modules["ray"].is_initialized():  # the default address honours RAY_ADDRESS
        from ragserve.ray.cluster import ray_session

        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        with pytest.raises(ClusterError, match=f"cannot reach a Ray cluster at 127.0.0.1:{port}"):
            with ray_session(None):
                pass
    result = CliRunner().invoke(app, ["build-index", str(tmp_path), "--out", str(tmp_path / "out"),
                                      "--ray-actors", "2"])
    assert result.exit_code == 2 and "need --ray" in result.output
    assert not (tmp_path / "out").exists()


def test_the_address_comes_from_the_ray_section_and_the_flag_overrides_it(tmp_path, monkeypatch):
    """``build-index --ray`` as ``batch --ray``: ``[ray] address`` (and ``local_num_cpus``)
    from the config, ``--ray-address`` over it. Recorded where the library meets the
    cluster (the probe, ``ray_session``), so no cluster and no model is needed."""
    pytest.importorskip("ray")
    from ragserve.ray import build as build_ray

    seen: list[tuple] = []

    def no_cluster(address, num_cpus=None):
        seen.append(("session", address, num_cpus))
        raise ClusterError("stopped before the cluster")

    monkeypatch.setattr(build_ray, "probe", lambda address: seen.append(("probe", address)))
    monkeypatch.setattr(build_ray, "start_build", lambda *a, **k: None)  # no model, no files
    monkeypatch.setattr(build_ray, "ray_session", no_cluster)
    monkeypatch.delenv("RAGSERVE_RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAGSERVE_RAY_LOCAL_NUM_CPUS", raising=False)
    toml = tmp_path / "ragserve.toml"
    toml.write_text('[ray]\naddress = "10.1.2.3:6379"\nlocal_num_cpus = 1\n', encoding="utf-8")

    def build(*flags):
        seen.clear()
        result = CliRunner().invoke(app, ["build-index", str(tmp_path), "--out", str(tmp_path / "out"),
                                          "--ray", *flags])
        assert result.exit_code == 1 and "stopped before the cluster" in result.output, result.output
        return list(seen)

    assert build("--config", str(toml)) == [("probe", "10.1.2.3:6379"), ("session", "10.1.2.3:6379", 1)]
    assert build("--config", str(toml), "--ray-address", "local") == [("session", "local", 1)]
    assert build("--config", str(toml), "--ray-address", "10.9.9.9:6379") == [
        ("probe", "10.9.9.9:6379"), ("session", "10.9.9.9:6379", 1)]
    assert build() == [("session", None, None)]  # neither: ray_session's own default (RAY_ADDRESS...)
    monkeypatch.setenv("RAGSERVE_RAY_ADDRESS", "auto")  # the section from the env, as every field
    assert build() == [("session", "auto", None)]

def test_a_sharded_ray_build_refuses_bad_input_before_the_model_or_the_cluster(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from ragserve.errors import ConfigError, IngestError
    from ragserve.ray import build as build_ray

    def no(*a, **k):
        raise AssertionError("started work before checking the input")

    monkeypatch.setattr(build_ray, "ray_session", no)
    monkeypatch.setattr(build_ray, "ready_embedder", no)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("text", encoding="utf-8")
    with pytest.raises(ConfigError, match="1..4096 shards, got 0"):
        build_ray.build_sharded_ray(tmp_path / "docs", tmp_path / "out", shards=0, address="local")
    with pytest.raises(IngestError, match="no such file or folder"):
        build_ray.build_sharded_ray(tmp_path / "missing", tmp_path / "out", shards=2, address="local")


@pytest.mark.ray
def test_an_actor_with_another_model_than_the_driver_fails_the_build(tmp_path, xquad_corpus, embedder,
                                                                     ray_cluster):
    from ragserve.errors import ModelError
    from ragserve.ray.build import build_index_ray

    other = CountingEmbedder(embedder, identity={"name": "other-model", "identity": "0" * 64})
    with pytest.raises(ModelError, match="is not the driver's"):
        build_index_ray(xquad_corpus[0], tmp_path / "out", embedder=other, actors=1)
    assert not (tmp_path / "out").exists()
    assert _cpus_free_again(sys.modules["ray"])


@pytest.mark.ray
def test_actors_that_cannot_start_fail_the_build_with_the_cpus_free(tmp_path, xquad_corpus, embedder,
                                                                   ray_cluster, monkeypatch):
    from ragserve.ray import build as build_ray

    # Three actors have slices to take (FINE_SLICES); the cluster has CPUs for two.
    monkeypatch.setattr(build_ray, "ACTOR_START_TIMEOUT_S", 5.0)
    with pytest.raises(ClusterError, match="3 embedding actors .* did not start within 5 s"):
        build_ray.build_index_ray(xquad_corpus[0], tmp_path / "out", FINE_SLICES, embedder=embedder, actors=3)
    assert not (tmp_path / "out").exists()
    assert _cpus_free_again(sys.modules["ray"])  # the two actors that did start were stopped


def _shard_set(version):
    """The top manifest and every shard's manifest (without ``created_at``), and every
    shard's chunks, of one version of a sharded index.

    Left out of the top: its ``files`` (each shard's manifest.json by SHA-256: those bytes
    hold the shard's ``created_at``), so its ``fingerprint``, and so the previous version's
    (``build.previous``): the run-dependent parts of a sharded build. What they vouch for is
    compared instead: each shard's manifest but ``created_at``, and each shard's fingerprint
    as the top lists it."""
    from ragserve.index.manifest import read_manifest
    from ragserve.retrieval.docstore import LazyDocStore

    top = read_manifest(version)
    shards = {}
    for entry in top.data["shards"]:
        store = LazyDocStore(top.folder / entry["name"])
        chunks = [(c.chunk_id, c.doc_id, c.text, c.metadata) for c in store.get_many(range(len(store)))]
        store.close()
        shards[entry["name"]] = (_manifest_body(read_manifest(top.folder / entry["name"])), chunks)
    body = {k: v for k, v in _manifest_body(top).items() if k not in ("files", "fingerprint")}
    body["build"] = {k: v for k, v in body["build"].items() if k != "previous"}
    return body, shards


@pytest.mark.ray
def test_a_sharded_ray_build_is_the_local_sharded_build_and_rebuilds_only_changed_shards(
        tmp_path, xquad_corpus, embedder, replay_embedder, ray_cluster):
    """``build-index --shards 3 --ray`` against ``--shards 3``: the same shard set (manifests
    but ``created_at``, chunks, each shard's fingerprint: ``_shard_set``); then one file
    changed: the Ray build embeds that file's chunks alone, on the actors, rebuilds its
    shard and links the others, and again equals the local incremental build."""
    from rich.console import Console

    from ragserve.build.sharded import build_sharded
    from ragserve.build.summary import print_build_summary
    from ragserve.index.shards import shard_name, shard_of
    from ragserve.ray.build import build_sharded_ray

    src = tmp_path / "src"
    shutil.copytree(xquad_corpus[0], src)
    # The default slices: a full build of the corpus is one slice, the call xquad_index made
    # already (replayed locally; the actor embeds it for real, and must match it).
    local = build_sharded(src, tmp_path / "local", RAGConfig(), shards=3, embedder=replay_embedder)
    driver = CountingEmbedder(embedder)
    on_ray = build_sharded_ray(src, tmp_path / "ray", RAGConfig(), shards=3, embedder=driver, actors=1)
    assert driver.texts == []  # the actor embedded, not this process
    assert _shard_set(on_ray.version) == _shard_set(local.version)
    assert on_ray.cluster["actors"] == 1 and on_ray.cluster["per_actor"][0]["chunks"] == on_ray.chunks
    assert {"ray_start", "actors", "embed"} <= set(on_ray.seconds)

    changed = sorted(src.glob("*.txt"))[3]
    changed.write_text(changed.read_text("utf-8") + " The shard archive moved in 2031.", encoding="utf-8")
    n = shard_of(changed.name, 3)
    local2 = build_sharded(src, tmp_path / "local", RAGConfig(), shards=3, embedder=replay_embedder)
    ray2 = build_sharded_ray(src, tmp_path / "ray", RAGConfig(), shards=3, embedder=driver, actors=1)
    assert driver.texts == []
    assert ray2.mode == "incremental" and ray2.changes["changed"] == 1
    assert [s["action"] for s in ray2.shards] == ["rebuilt" if i == n else "linked" for i in range(3)]
    record = _shard_set(ray2.version)[1][shard_name(n)][0]["corpus"]["files"][changed.name]
    assert ray2.embedded == record["chunks"] == sum(a["chunks"] for a in ray2.cluster["per_actor"])
    for i in range(3):  # the linked shards are the previous version's very files
        same = (on_ray.version / shard_name(i) / "index.faiss").stat().st_ino == (
            ray2.version / shard_name(i) / "index.faiss").stat().st_ino
        assert same == (i != n)
    assert _shard_set(ray2.version) == _shard_set(local2.version)
    printed = Console(record=True, width=200)
    print_build_summary(printed, ray2)  # what `build-index --shards 3 --ray` prints
    text = printed.export_text()
    assert "files read on this machine; 1 embedding actors" in text and "actor 0 on" in text
    assert f"{shard_name(n)}: {ray2.shards[n]['chunks']} chunks, rebuilt" in text and "linked" in text


def test_cli_build_index_shards_ray_builds_the_shards_on_ray(tmp_path, monkeypatch):
    """``--shards N --ray`` goes to ``build_sharded_ray`` with the shard count and the Ray
    options (once refused); ``--dry-run`` with ``--shards`` is still refused. Recorded at the
    call, so no cluster and no model is needed."""
    pytest.importorskip("ray")
    from ragserve.ray import build as build_ray

    seen: list[tuple] = []

    def stop(source, out, config, **kwargs):
        seen.append((config.index.shards, kwargs["address"], kwargs["actors"]))
        raise ClusterError("stopped before the cluster")

    monkeypatch.setattr(build_ray, "build_sharded_ray", stop)
    flags = ["--shards", "2", "--ray", "--ray-address", "local", "--ray-actors", "3"]
    result = CliRunner().invoke(app, ["build-index", str(tmp_path), "--out", str(tmp_path / "out"), *flags])
    assert result.exit_code == 1 and "stopped before the cluster" in result.output, result.output
    assert seen == [(2, "local", 3)]
    dry = CliRunner().invoke(app, ["build-index", str(tmp_path), "--out", str(tmp_path / "out"),
                                   "--shards", "2", "--dry-run"])
    assert dry.exit_code == 2 and "--dry-run" in dry.output
