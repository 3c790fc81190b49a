import orjson
import pytest

from ragserve.errors import IndexIntegrityError, IndexMismatchError, IndexNotFoundError
from ragserve.index.manifest import MANIFEST_FILE, check_embedding, fingerprint, read_manifest, write_manifest
from ragserve.index.verify import verify


def _folder(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"0123456789" * 100)
    (tmp_path / "b.txt").write_text("hello")
    body = {"embedding": {"name": "m", "identity": "abc", "dim": 4}, "chunking": {}, "index": {},
            "counts": {}, "created_at": "now"}
    return write_manifest(tmp_path, body, ["a.bin", "b.txt"])


def test_verify_ok_and_fingerprint_ignores_creation_time(tmp_path):
    m = _folder(tmp_path)
    assert verify(tmp_path).fingerprint == m["fingerprint"]
    assert fingerprint({**m, "created_at": "later"}) == m["fingerprint"]
    assert fingerprint({**m, "counts": {"chunks": 1}}) != m["fingerprint"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "a.bin").unlink(), "missing"),
        (lambda p: (p / "a.bin").write_bytes(b"0123"), "truncated"),
        (lambda p: (p / "a.bin").write_bytes(b"0123456789" * 99 + b"012345678X"), "altered"),
        (lambda p: (p / "b.txt").write_text("hello, more"), "grown"),
    ],
)
def test_damaged_files_are_named(tmp_path, damage, message):
    _folder(tmp_path)
    damage(tmp_path)
    with pytest.raises(IndexIntegrityError, match=message) as e:
        verify(tmp_path)
    assert e.value.path.parent == tmp_path


def test_edited_or_broken_manifest(tmp_path):
    m = _folder(tmp_path)
    path = tmp_path / MANIFEST_FILE
    path.write_bytes(orjson.dumps({**m, "counts": {"chunks": 999}}))
    with pytest.raises(IndexIntegrityError, match="edited"):
        read_manifest(tmp_path)
    path.write_text("{not json")
    with pytest.raises(IndexIntegrityError, match="not valid JSON"):
        read_manifest(tmp_path)
    path.write_bytes(orjson.dumps({**m, "format_version": 99}))
    with pytest.raises(IndexMismatchError, match="format version"):
        read_manifest(tmp_path)


def test_missing_folder_suggests_build_index(tmp_path):
    with pytest.raises(IndexNotFoundError, match="ragserve build-index") as e:
        verify(tmp_path / "nope")
    assert "nope" in str(e.value)
    with pytest.raises(IndexNotFoundError, match="no manifest.json"):
        verify(tmp_path)


def test_embedding_mismatch(tmp_path):
    m = read_manifest(tmp_path) if _folder(tmp_path) else None
    check_embedding(m, {"name": "m", "identity": "abc"}, 4)
    with pytest.raises(IndexMismatchError, match="4-d"):
        check_embedding(m, {"name": "m", "identity": "abc"}, 8)
    with pytest.raises(IndexMismatchError, match="embedding model"):
        check_embedding(m, {"name": "other", "identity": "zzz"}, 4)
