import pytest

from ragserve.errors import IndexIntegrityError
from ragserve.retrieval.docstore import CHUNKS_FILE, LazyDocStore, write_docstore
from ragserve.types import Chunk


def _chunks(n):
    return [Chunk(i, f"doc{i % 3}.txt", f"text {i} ünïcode ✓\nwith a newline", {"i": i}) for i in range(n)]


def test_roundtrip_any_order(tmp_path):
    assert write_docstore(tmp_path, _chunks(50)) == 50
    store = LazyDocStore(tmp_path)
    assert len(store) == 50
    got = store.get_many([42, 0, 7])
    assert [c.chunk_id for c in got] == [42, 0, 7]
    assert got[0] == _chunks(50)[42]
    store.close()


def test_unknown_id_is_a_key_error(tmp_path):
    write_docstore(tmp_path, _chunks(3))
    store = LazyDocStore(tmp_path)
    with pytest.raises(KeyError):
        store.get(3)
    with pytest.raises(KeyError):
        store.get(-1)


def test_ids_must_be_consecutive(tmp_path):
    with pytest.raises(ValueError, match="consecutive"):
        write_docstore(tmp_path, [Chunk(1, "a", "x")])


def test_truncated_file_is_refused(tmp_path):
    write_docstore(tmp_path, _chunks(5))
    path = tmp_path / CHUNKS_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(IndexIntegrityError, match="offsets"):
        LazyDocStore(tmp_path)


def test_open_reads_nothing_but_offsets(tmp_path):
    # The store maps the chunk file: opening a big store must not read it into memory.
    write_docstore(tmp_path, (Chunk(i, "d", "x" * 1000) for i in range(5000)))
    import tracemalloc

    tracemalloc.start()
    store = LazyDocStore(tmp_path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 200_000  # the chunk file is 5 MB
    assert store.get(4999).text == "x" * 1000
