"""Issue 28, part 3: index folders whose manifest was re-hashed over inconsistent contents
(what a buggy writer or a hand-made copy leaves) are refused when opened, by verify-index
and by an incremental build on top of them, which leaves them byte for byte as they were.

Real components: a real index built by ``build_index`` (MiniLM, FAISS), tampered with on
disk, its manifest re-hashed by the writer's own ``write_manifest``."""

from __future__ import annotations

import re
import shutil

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from ragserve import RAG
from ragserve.build.builder import build_index
from ragserve.cli.main import app
from ragserve.config import RAGConfig
from ragserve.errors import IndexIntegrityError
from ragserve.index.manifest import MANIFEST_FILE, read_manifest, write_manifest
from ragserve.index.verify import verify
from ragserve.retrieval.docstore import CHUNKS_FILE, OFFSETS_FILE
from ragserve.retrieval.faiss_index import INDEX_FILE, FaissIndex
from ragserve.retrieval.index_spec import IndexSpec
from ragserve.testing.fakes import FakeGenerator

from .conftest import write_xquad_corpus

pytestmark = pytest.mark.integration

CONFIG = RAGConfig().replace(chunk={"chunk_size": 64, "chunk_overlap": 8})  # several chunks per file


@pytest.fixture(scope="module")
def built(tmp_path_factory, embedder):
    """A source folder (one XQuAD paragraph per file) and a real index built from it."""
    root = tmp_path_factory.mktemp("contents")
    write_xquad_corpus(root / "src", n_articles=1)  # one file per paragraph
    build_index(root / "src", root / "idx", CONFIG, embedder=embedder)
    return root / "src", root / "idx"


def _reseal(folder, edit=None):
    """Re-hash the manifest over the files as they now are, as the writer does."""
    body = orjson.loads((folder / MANIFEST_FILE).read_bytes())
    if edit is not None:
        edit(body)
    files = list(body.pop("files"))
    body.pop("fingerprint")
    write_manifest(folder, body, files)


def _files(folder):
    return read_manifest(folder).data["corpus"]["files"]


def _two_files_one_range(folder):
    a, b = [d for d, r in _files(folder).items() if r["chunks"]][1:3]

    def edit(body):
        body["corpus"]["files"][b]["first_chunk"] = body["corpus"]["files"][a]["first_chunk"]
    _reseal(folder, edit)


def _past_the_end(folder):
    last = max(_files(folder).items(), key=lambda kv: kv[1]["first_chunk"])[0]

    def edit(body):
        body["corpus"]["files"][last]["first_chunk"] += 5
    _reseal(folder, edit)


def _rewrite_vectors(folder, change):
    m = read_manifest(folder)
    index = FaissIndex.load(folder, IndexSpec.from_manifest(m.data["index"]), mmap=False)
    x = change(index.vectors(0, index.ntotal))
    FaissIndex.build(x, IndexSpec.from_manifest(m.data["index"])).save(folder)
    _reseal(folder)


def _lines(folder):
    return (folder / CHUNKS_FILE).read_bytes().splitlines(keepends=True)


def _write_lines(folder, lines):
    (folder / CHUNKS_FILE).write_bytes(b"".join(lines))
    np.save(folder / OFFSETS_FILE, np.cumsum([0] + [len(x) for x in lines]).astype(np.uint64), allow_pickle=False)


def _duplicated_line(folder):
    """Chunk k+1 replaced by a copy of chunk k of the same file: one chunk served twice."""
    lines = _lines(folder)
    doc = [orjson.loads(x)["doc_id"] for x in lines]
    k = next(i for i in range(len(doc) - 1) if doc[i] == doc[i + 1])
    lines[k + 1] = lines[k]
    _write_lines(folder, lines)
    _reseal(folder)
    return k


def _swapped_records(folder):
    """Two files' first records swapped: each chunk in the other file's range."""
    lines = _lines(folder)
    doc = [orjson.loads(x)["doc_id"] for x in lines]
    k = next(i for i in range(1, len(doc)) if doc[i] != doc[i - 1])
    lines[k - 1], lines[k] = lines[k], lines[k - 1]
    _write_lines(folder, lines)
    _reseal(folder)


def _other_metric(folder):
    import faiss

    m = read_manifest(folder)
    index = FaissIndex.load(folder, IndexSpec.from_manifest(m.data["index"]), mmap=False)
    flat = faiss.index_factory(index.dim, "SQfp16", faiss.METRIC_L2)
    flat.add(index.vectors(0, index.ntotal))
    faiss.write_index(flat, str(folder / INDEX_FILE))
    _reseal(folder)


def _one_offset_more(folder):
    lines = _lines(folder)
    _write_lines(folder, [*lines, lines[-1]])
    _reseal(folder)


CASES = {
    "two files claim one range": (_two_files_one_range, MANIFEST_FILE, r"chunks \d+–\d+ are claimed by both \S+ and "),
    "range past the end": (_past_the_end, MANIFEST_FILE, r"claims chunks \d+–\d+, past the end of the docstore"),
    "all vectors zero": (lambda f: _rewrite_vectors(f, np.zeros_like), INDEX_FILE, r"all \d+ vectors \w+ are zero"),
    "all vectors NaN": (lambda f: _rewrite_vectors(f, lambda x: np.full_like(x, np.nan)), INDEX_FILE,
                        "is not finite"),
    "vectors not unit norm": (lambda f: _rewrite_vectors(f, lambda x: x * 0.5), INDEX_FILE,
                              r"has norm 0.500 .* not of unit norm\), although the manifest says the embeddings"),
    "a docstore line duplicated": (_duplicated_line, CHUNKS_FILE, r"chunks (\d+) and \d+ are the same record"),
    "records in another file's range": (_swapped_records, CHUNKS_FILE,
                                        r"chunk \d+ is a record of '\S+', but the manifest gives chunks"),
    # refused before this change too (keep them so), now also by an incremental build
    "another FAISS metric": (_other_metric, INDEX_FILE, "not inner product"),
    "one offset more": (_one_offset_more, OFFSETS_FILE, "describes"),
}


def _snapshot(folder):
    """Every byte under the index's parent: the folder, and nothing written beside it."""
    return {p.relative_to(folder.parent): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.parent.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_an_inconsistent_index_is_refused_everywhere_and_left_as_it_was(tmp_path, built, embedder, case):
    tamper, bad_file, message = CASES[case]
    src, idx = built
    folder = tmp_path / "index" / "idx"
    shutil.copytree(idx, folder)  # a plain folder: what an index from before versioning is
    assert read_manifest(folder).data["corpus"]
    tamper(folder)

    with pytest.raises(IndexIntegrityError, match=message) as opened:
        RAG.from_index(folder, CONFIG, start_engine=False, embedder=embedder, generator=FakeGenerator())
    assert opened.value.path == folder / bad_file

    r = CliRunner().invoke(app, ["verify-index", str(folder)])
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and f"{bad_file}: " in text and re.search(message, text), r.output

    changed = tmp_path / "src"
    shutil.copytree(src, changed)
    first = min(changed.glob("*.txt"))
    first.write_text(first.read_text("utf-8") + " The river was renamed in 1901.", encoding="utf-8")
    before = _snapshot(folder)
    with pytest.raises(IndexIntegrityError, match=message) as refused:
        build_index(changed, folder, CONFIG, embedder=embedder)
    assert refused.value.path == folder / bad_file
    assert "nothing is reused from it" in str(refused.value) and "--full" in str(refused.value)
    assert _snapshot(folder) == before


def test_the_untampered_index_opens_verifies_and_builds_on(tmp_path, built, embedder):
    src, idx = built
    folder = tmp_path / "index" / "idx"
    shutil.copytree(idx, folder)
    RAG.from_index(folder, CONFIG, start_engine=False, embedder=embedder, generator=FakeGenerator()).close()
    r = CliRunner().invoke(app, ["verify-index", str(folder)])
    text = " ".join(r.output.split())
    chunks = read_manifest(folder).data["counts"]["chunks"]
    assert r.exit_code == 0, r.output
    files = len(_files(folder))
    assert files > 2 and chunks > files  # some files have several chunks
    assert f"contents agree: the chunk ranges of {files} source files cover chunks 0–{chunks - 1} once" in text
    assert f"vectors checked: all {chunks}: finite, not all zero, unit norm" in text
    report = build_index(src, folder, CONFIG, embedder=embedder)  # nothing changed: migrated, nothing embedded
    assert report.embedded == 0


def test_a_docstore_written_with_another_key_order_is_judged_by_its_doc_ids(tmp_path, built):
    folder = tmp_path / "idx"
    shutil.copytree(built[1], folder)
    lines = [orjson.dumps(dict(reversed(orjson.loads(x).items()))) + b"\n" for x in _lines(folder)]
    assert not lines[0].startswith(b'{"doc_id"')
    _write_lines(folder, lines)
    _reseal(folder)
    assert verify(folder, vectors="all")
    lines[1], lines[-1] = lines[-1], lines[1]
    _write_lines(folder, lines)
    _reseal(folder)
    with pytest.raises(IndexIntegrityError, match="chunk 1 is a record of"):
        verify(folder)


def test_vectors_read_back_for_reuse_are_checked_row_by_row(tmp_path):
    from ragserve.index.contents import check_reused

    rows = np.eye(4, dtype=np.float32)
    check_reused(tmp_path, [(10, rows)], normalized=True)
    rows[2, 1] = np.nan
    with pytest.raises(IndexIntegrityError, match="the vector of chunk 12 is not finite"):
        check_reused(tmp_path, [(10, rows[:2]), (12, rows[2:])], normalized=True)
    with pytest.raises(IndexIntegrityError, match="chunk 7 has norm 3.000"):
        check_reused(tmp_path, [(5, np.eye(4, dtype=np.float32) * [[1], [1], [3], [1]])], normalized=True)


def test_a_document_given_twice_is_indexed_once_so_the_index_opens(tmp_path, embedder):
    from ragserve.build.builder import build_from_documents
    from ragserve.build.ingest import Document

    text = "The Rhine flows from the Swiss Alps to the North Sea. " * 3
    docs = [Document("a", text, {"title": "A"}), Document("b", text, {"title": "B"}),
            Document("a", text, {"title": "A"})]
    report = build_from_documents(docs, tmp_path / "idx", CONFIG, embedder=embedder)
    m = verify(tmp_path / "idx", vectors="all")
    assert report.chunks == m.data["counts"]["chunks"] and {c.doc_id for c in _chunks(m.folder)} == {"a", "b"}
    assert len(_chunks(m.folder)) == 2 * len([c for c in _chunks(m.folder) if c.doc_id == "a"])


def _chunks(folder):
    from ragserve.retrieval.docstore import LazyDocStore

    store = LazyDocStore(folder)
    try:
        return store.get_many(range(len(store)))
    finally:
        store.close()
