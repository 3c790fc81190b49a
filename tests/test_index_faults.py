"""Faults at every step of an index write (issue 28): each write, fsync, link and rename
of a build, made to fail in turn with ENOSPC or EIO. For each: the build fails with
``IndexWriteError`` naming the step and the file; the index published before opens,
verifies and answers exactly as before; no part of the new version is left in the
versions folder; and the same build run again succeeds and equals a clean build.

The faults are raised from the OS calls themselves (``open`` for writing, ``os.fsync``,
``os.rename``/``os.replace``, ``os.symlink``/``os.link``), matched by the file they act on,
so every caller of the one index writer (``index/writer.py``, ``index/versions.py``,
``retrieval/docstore.py``, ``FaissIndex.save``) is reached the way a full disk would reach it.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from ragserve.build.builder import build_index
from ragserve.errors import IndexWriteError
from ragserve.index.verify import verify
from ragserve.index.versions import versions_dir
from ragserve.retrieval.docstore import LazyDocStore
from ragserve.retrieval.faiss_index import FaissIndex
from ragserve.testing.fakes import FakeEmbedder

OUT = "docs"
QUESTIONS = ["Which document talks about topic 2?", "apples and pears", "number 5", "sentence"]


def _write_corpus(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"d{i}.txt").write_text(
            f"Document {i} talks about topic {i}. It has sentences about apples and pears, number {i}. "
            f"Here is one more sentence for document {i}, so that it is not too short.\n")


def _answers(out: Path) -> list[list[tuple[int, float, str]]]:
    """What the published index answers: top hits (id, score, text) for fixed questions."""
    manifest = verify(out)  # every file's hash, the structure; raises if anything is off
    index = FaissIndex.load(manifest.folder, manifest.data["index"]["type"], mmap=False)
    store = LazyDocStore(manifest.folder)
    try:
        queries = FakeEmbedder().encode(QUESTIONS)
        out_ = []
        for q in queries:
            hits = index.search(np.asarray([q]), 3)[0]
            out_.append([(h.chunk_id, round(float(h.score), 6), store.get(h.chunk_id).text) for h in hits])
        return out_
    finally:
        store.close()


class Faults:
    """Make one OS step fail on the files whose name matches ``target`` (a regex)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, step: str, target: str, code: int):
        self.target, self.code, self.hits = re.compile(target), code, []
        real_open, real_fsync = builtins.open, os.fsync
        real = {name: getattr(os, name) for name in ("rename", "replace", "symlink", "link")}

        def fail(what: str, path: str) -> None:
            self.hits.append((step, os.path.basename(path)))
            raise OSError(code, os.strerror(code), path)

        def matches(*paths) -> str | None:
            for p in paths:
                if self.target.search(os.path.basename(os.fspath(p))):
                    return os.fspath(p)
            return None

        if step == "write":
            def opener(file, mode="r", *args, **kwargs):
                f = real_open(file, mode, *args, **kwargs)
                if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax") and matches(file):
                    return _FailingFile(f, lambda: fail("write", os.fspath(file)))
                return f

            monkeypatch.setattr(builtins, "open", opener)
            monkeypatch.setattr(io, "open", opener)
        elif step == "fsync":
            def fsync(fd):
                path = os.readlink(f"/proc/self/fd/{fd}")
                if matches(path):
                    fail("fsync", path)
                return real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)
        else:
            names = ("rename", "replace") if step == "rename" else ("symlink", "link")
            for name in names:
                def call(src, dst, *args, _real=real[name], **kwargs):
                    # a symlink is matched by the link it makes; a rename by either end
                    hit = matches(dst) if step == "link" else matches(src, dst)
                    if hit:
                        fail(step, hit)
                    return _real(src, dst, *args, **kwargs)

                monkeypatch.setattr(os, name, call)


class _FailingFile:
    """A file open for writing whose writes land half, then fail (a disk that fills up)."""

    def __init__(self, f, fail):
        self._f, self._fail = f, fail

    def write(self, data):
        self._f.write(bytes(memoryview(data).cast("B")[: len(data) // 2]))
        self._fail()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


# (step, the file the fault hits (regex on its name), what the error must name (regex))
STEPS = [
    ("write", r"index\.faiss$", r"^index\.faiss$"),
    ("write", r"^\.chunks\.jsonl\.tmp", r"^chunks\.jsonl$"),
    ("write", r"^\.chunks\.offsets\.npy\.tmp", r"^chunks\.offsets\.npy$"),
    ("write", r"^manifest\.json$", r"^manifest\.json$"),
    ("fsync", r"^index\.faiss$", r"^index\.faiss$"),
    ("fsync", r"^chunks\.jsonl$", r"^chunks\.jsonl$"),
    ("fsync", r"^manifest\.json$", r"^manifest\.json$"),
    ("fsync", r"^\.building-\d+$", r"^\.building-\d+$"),  # the new folder's entries
    ("fsync", rf"^\.{OUT}\.v$", rf"^\.{OUT}\.v$"),  # the versions folder, after the rename
    ("rename", r"^\.chunks\.jsonl\.tmp", r"^chunks\.jsonl$"),
    ("rename", r"^\.chunks\.offsets\.npy\.tmp", r"^chunks\.offsets\.npy$"),
    ("rename", r"^\.building-\d+$", r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{12}$"),  # the folder to its version name
    ("link", rf"^\.{OUT}\.link-\d+$", rf"^\.{OUT}\.link-\d+$"),  # the new link
    ("rename", rf"^{OUT}$", rf"^{OUT}$"),  # the flip: the new link over the old one
]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The fingerprint a clean build of the changed corpus gives."""
    src = tmp_path_factory.mktemp("clean") / "src"
    _write_corpus(src, 5)
    return build_index(src, src.parent / OUT, embedder=FakeEmbedder()).fingerprint


@pytest.mark.parametrize("full", [False, True], ids=["incremental", "full"])
@pytest.mark.parametrize(("step", "target", "named"), STEPS,
                         ids=[f"{s}-{t.strip('^$')}" for s, t, _ in STEPS])
def test_a_fault_at_each_step_leaves_the_published_index_as_it_was(tmp_path, monkeypatch, clean, step, target,
                                                                   named, full):
    src, out = tmp_path / "src", tmp_path / OUT
    _write_corpus(src, 4)
    before = build_index(src, out, embedder=FakeEmbedder())
    published, answers = os.path.realpath(out), _answers(out)
    vdir = versions_dir(out)
    listing = sorted(p.name for p in vdir.iterdir())
    _write_corpus(src, 5)  # one more file: a new version to write

    code = errno.ENOSPC if len(step) % 2 else errno.EIO
    faults = Faults(monkeypatch, step, target, code)
    with pytest.raises(IndexWriteError) as caught:
        build_index(src, out, embedder=FakeEmbedder(), full=full)
    monkeypatch.undo()
    e = caught.value
    assert faults.hits, "the fault was never reached"
    assert e.step == step and e.errno == code and re.search(named, e.path.name), (e.step, e.path, str(e))
    assert f"could not {step} it: {os.strerror(code)}" in str(e)

    # the old index: still what the path names, whole, answering as before
    assert os.path.realpath(out) == published
    assert verify(out).fingerprint == before.fingerprint
    assert _answers(out) == answers
    # nothing of the new version left: no building folder, no version, no link, no temp file
    assert sorted(p.name for p in vdir.iterdir()) == listing
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", OUT, vdir.name])
    assert not [p for p in Path(published).iterdir() if p.name.startswith(".")]

    again = build_index(src, out, embedder=FakeEmbedder(), full=full)
    assert again.fingerprint == clean == verify(out).fingerprint
    assert os.path.realpath(out) != published


def test_a_full_disk_under_faiss_is_an_error_not_a_truncated_file(tmp_path):
    """FAISS's own writer reports a failed close only on stderr: writing to a full disk
    (here /dev/full, a real ENOSPC) returned as if it had worked, and the build would
    have hashed and published a truncated index.faiss."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    index = FaissIndex.build(np.eye(8, dtype=np.float32), "flat-fp16")
    (tmp_path / "index.faiss").symlink_to("/dev/full")
    with pytest.raises(IndexWriteError, match="index.faiss: could not write it: No space left on device"):
        index.save(tmp_path)


def test_a_docstore_write_on_a_full_disk_names_the_file(tmp_path):
    """The lines' last buffered bytes fail only when the file is closed: still typed, still named."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    from ragserve.retrieval.docstore import write_docstore
    from ragserve.types import Chunk

    (tmp_path / f".chunks.jsonl.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(IndexWriteError, match=r"chunks\.jsonl: could not write it: No space left") as caught:
        write_docstore(tmp_path, [Chunk(i, "d.txt", f"chunk {i}") for i in range(3)])
    assert caught.value.step == "write"
    assert list(tmp_path.iterdir()) == []  # the temporary name is gone (it was the link)


def test_the_cli_reports_the_step_and_exits_1(tmp_path, monkeypatch):
    """`ragserve build-index` on a full disk: one line naming the step and file, exit 1."""
    from typer.testing import CliRunner

    import ragserve.build.builder as builder
    from ragserve.cli.main import app

    src = tmp_path / "src"
    _write_corpus(src, 2)
    monkeypatch.setattr(builder, "_embedder", lambda config: FakeEmbedder())
    Faults(monkeypatch, "write", r"^manifest\.json$", errno.ENOSPC)
    result = CliRunner().invoke(app, ["build-index", str(src), "--out", str(tmp_path / OUT)])
    assert result.exit_code == 1, result.output
    assert "manifest.json: could not write it: No space left on device" in result.output
    assert "Traceback" not in result.output
    shutil.rmtree(src)


SHARD_STEPS = [
    ("write", r"^index\.faiss$", r"^index\.faiss$"),  # a shard's vectors
    ("write", r"^manifest\.json$", r"^manifest\.json$"),  # a shard's manifest, then the top one
    ("fsync", r"^shard-\d+$", r"^shard-\d+$"),  # a shard folder's entries
    ("link", rf"^\.{OUT}\.link-\d+$", rf"^\.{OUT}\.link-\d+$"),
]


@pytest.mark.parametrize(("step", "target", "named"), SHARD_STEPS,
                         ids=[s + "-" + t.strip("^$") for s, t, _ in SHARD_STEPS])
def test_a_fault_in_a_sharded_build_leaves_the_published_shards_as_they_were(
        tmp_path, monkeypatch, step, target, named):
    from ragserve.build.sharded import build_sharded

    src, out = tmp_path / "src", tmp_path / OUT
    _write_corpus(src, 4)
    before = build_sharded(src, out, shards=2, embedder=FakeEmbedder())
    published = os.path.realpath(out)
    listing = sorted(p.name for p in versions_dir(out).iterdir())
    _write_corpus(src, 6)
    Faults(monkeypatch, step, target, errno.EIO)
    with pytest.raises(IndexWriteError) as caught:
        build_sharded(src, out, shards=2, embedder=FakeEmbedder())
    monkeypatch.undo()
    assert caught.value.step == step and re.search(named, caught.value.path.name), str(caught.value)
    assert os.path.realpath(out) == published and verify(out).fingerprint == before.fingerprint
    assert sorted(p.name for p in versions_dir(out).iterdir()) == listing
    again = build_sharded(src, out, shards=2, embedder=FakeEmbedder())
    assert verify(out).fingerprint == again.fingerprint != before.fingerprint
