"""Versioned index folders: the index path names the old index or the new one at every
step of a build, whatever fails or is killed (real files, real FAISS, small indexes)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import ragserve.index.versions as versions
from ragserve.errors import IndexError_, IndexNotFoundError, IndexWriteError
from ragserve.index.manifest import read_manifest
from ragserve.index.verify import verify
from ragserve.index.versions import LOCK_FILE, clean_leftovers, complete_versions, versions_dir
from ragserve.index.writer import embedding_section, publish_index_folder, write_index_folder
from ragserve.retrieval.faiss_index import FaissIndex
from ragserve.types import Chunk

ROOT = Path(__file__).resolve().parent.parent


def _parts(seed: int) -> tuple[FaissIndex, dict]:
    """A tiny real index whose content (and so fingerprint) depends on ``seed``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    chunks = [Chunk(i, f"doc{seed}.txt", f"chunk {i} of version {seed}", {}) for i in range(8)]
    return FaissIndex.build(x, "flat-fp16"), {
        "chunks": chunks, "embedding": embedding_section({"name": "test", "identity": "t" * 64}, "test", 4),
        "chunking": {"splitter": "test"}, "counts": {"chunks": 8}}


def _publish(out: Path, seed: int) -> str:
    index, parts = _parts(seed)
    return publish_index_folder(out, index, **parts)[0]["fingerprint"]


def _write_plain(folder: Path, seed: int) -> str:
    """An index folder as builds wrote it before versioning: a plain folder at the path."""
    folder.mkdir(parents=True)
    index, parts = _parts(seed)
    return write_index_folder(folder, index, **parts)["fingerprint"]


def _leftovers(out: Path) -> list[str]:
    """Anything around ``out`` that is neither the link, a complete version nor the lock."""
    vdir = versions_dir(out)
    kept = {v.name for v in complete_versions(vdir)} | {LOCK_FILE}
    inside = [p.name for p in vdir.iterdir() if p.name not in kept] if vdir.is_dir() else []
    beside = [p.name for p in out.parent.iterdir() if p.name not in (out.name, vdir.name)]
    return inside + beside


def test_layout_and_retention(tmp_path):
    out = tmp_path / "idx"
    fps = [_publish(out, seed) for seed in range(3)]
    assert out.is_symlink() and os.readlink(out).startswith(".idx.v/")  # relative: the folder can move
    m = verify(out)
    assert m.fingerprint == fps[2] and m.folder == (tmp_path / os.readlink(out)).resolve()
    # the current version and the one before it are kept; the oldest is gone
    kept = [read_manifest(v).fingerprint for v in complete_versions(versions_dir(out))]
    assert kept == fps[1:]
    assert _leftovers(out) == []


def test_an_open_index_stays_on_its_version_when_the_link_flips(tmp_path):
    from ragserve.retrieval.docstore import LazyDocStore

    out = tmp_path / "idx"
    _publish(out, 0)
    opened = verify(out)
    store = LazyDocStore(opened.folder)
    _publish(out, 1)
    _publish(out, 2)  # the version still open is now two behind: removed from disk
    assert store.get(3).text == "chunk 3 of version 0"  # mapped and open: still readable
    assert not opened.folder.exists()
    assert verify(out).data["counts"]["chunks"] == 8 and read_manifest(out).folder != opened.folder
    store.close()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_plain_folder_index_opens_and_is_migrated(tmp_path, monkeypatch, exchange):
    out = tmp_path / "idx"
    old = _write_plain(out, 0)
    assert verify(out).fingerprint == old and verify(out).folder == out  # still opens as before
    if not exchange:
        def unsupported(a, b):
            raise NotImplementedError("no RENAME_EXCHANGE on this file system")

        monkeypatch.setattr(versions, "_exchange", unsupported)
    new = _publish(out, 1)
    assert out.is_symlink() and verify(out).fingerprint == new
    # the plain folder is kept as the previous version, under the versions folder
    assert [read_manifest(v).fingerprint for v in complete_versions(versions_dir(out))] == [old, new]
    assert _leftovers(out) == []


def test_a_missing_link_is_served_from_the_newest_version_and_repaired(tmp_path):
    out = tmp_path / "idx"
    _publish(out, 0)
    new = _publish(out, 1)
    out.unlink()  # what a crash between the two renames of a fallback migration leaves
    assert verify(out).fingerprint == new  # served meanwhile
    clean_leftovers(out)
    assert out.is_symlink() and verify(out).fingerprint == new
    with pytest.raises(IndexNotFoundError):
        verify(tmp_path / "other")


class Fault:
    """Wraps one function so that its ``at``-th call fails (``at`` 0: never; counts calls)."""

    def __init__(self, monkeypatch, owner, name: str, at: int) -> None:
        self.calls, real = 0, getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.calls += 1
            if self.calls == at:
                raise OSError(f"injected: {name} call {at}")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)


FAULTS = [(os, "rename"), (os, "replace"), (os, "symlink"), (shutil, "rmtree"), (os, "unlink"), (os, "fsync"),
          (versions, "_exchange")]


def _fingerprint(seed: int, scratch: Path) -> str:
    """The fingerprint a folder of ``seed``'s content gets (it does not depend on time or place)."""
    return _write_plain(scratch / f"fp{seed}", seed)


@pytest.mark.parametrize("start", ["versioned", "plain"])
@pytest.mark.parametrize(("owner", "name"), FAULTS, ids=[n for _, n in FAULTS])
def test_a_failure_at_any_step_leaves_old_or_new_and_the_next_build_recovers(tmp_path, monkeypatch, start,
                                                                             owner, name):
    new = _fingerprint(1, tmp_path / "scratch")

    def scenario(out: Path, at: int) -> tuple[str, bool, int]:
        old = _publish(out, 0) if start == "versioned" else _write_plain(out, 0)
        with monkeypatch.context() as m:
            fault = Fault(m, owner, name, at)
            try:
                _publish(out, 1)
                failed = False
            except (OSError, IndexWriteError) as e:  # the writer's own steps name themselves
                assert "injected" in str(e)
                failed = True
        return old, failed, fault.calls

    _, _, calls = scenario(tmp_path / "count" / "idx", 0)
    on_path = {"rename", "symlink", "fsync"} | ({"replace"} if start == "versioned" else {"_exchange"})
    assert calls >= 1 or name not in on_path  # the step under test is really taken
    for at in range(1, calls + 1):
        out = tmp_path / f"at{at}" / "idx"
        old, failed, _ = scenario(out, at)
        # never neither: a build that raised left the old index, one that returned the new one
        assert verify(out).fingerprint == (old if failed else new), (name, at)
        latest = _publish(out, 2)  # the next build recovers and cleans up
        assert verify(out).fingerprint == latest and out.is_symlink()
        assert _leftovers(out) == [], (name, at)


KILL_CHILD = textwrap.dedent("""
    import os, shutil, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import ragserve.index.writer
    import test_versions
    box = {{"os": os, "shutil": shutil, "index_folder": ragserve.index.writer}}[sys.argv[2]]
    name, at = sys.argv[3], int(sys.argv[4])
    real, calls = getattr(box, name), [0]

    def killed(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            os._exit(137)  # a kill: no finally block, no cleanup runs
        return real(*args, **kwargs)

    setattr(box, name, killed)
    test_versions._publish(Path(sys.argv[1]), 1)
""")

KILLS = [("os", "rename", 1), ("os", "rename", 2), ("os", "replace", 1), ("os", "symlink", 1),
         ("os", "fsync", 1), ("shutil", "rmtree", 1), ("index_folder", "write_manifest", 1)]


@pytest.mark.parametrize("start", ["versioned", "plain"])
@pytest.mark.parametrize(("target", "name", "at"), KILLS, ids=[f"{t}.{n}#{a}" for t, n, a in KILLS])
def test_a_kill_at_any_step_leaves_old_or_new_and_dead_leftovers_are_removed(tmp_path, start, target, name, at):
    out = tmp_path / "w" / "idx"
    if start == "versioned":
        _publish(out, 3)
        old = _publish(out, 0)  # a previous version exists, so retention has something to remove
    else:
        old = _write_plain(out, 0)
    new = _fingerprint(1, tmp_path / "scratch")
    script = KILL_CHILD.format(tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", script, str(out), target, name, str(at)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode in (0, 137), proc.stderr[-2000:]
    served = verify(out).fingerprint
    assert served in {old, new}  # never neither
    if proc.returncode == 0:
        assert served == new  # the step was never reached: the build finished
    latest = _publish(out, 2)  # a later build removes what the dead one left
    assert verify(out).fingerprint == latest
    assert _leftovers(out) == []


def test_live_builds_leftovers_are_kept_and_dead_ones_removed(tmp_path):
    out = tmp_path / "idx"
    _publish(out, 0)
    vdir = versions_dir(out)
    sleeper = subprocess.Popen(["sleep", "60"])
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    try:
        (vdir / f".building-{sleeper.pid}").mkdir()
        (vdir / f".building-{dead_pid.pid}").mkdir()
        (vdir / ".trash-20200101T000000.000000Z-abc").mkdir()
        os.symlink(".idx.v/nowhere", tmp_path / f".idx.link-{dead_pid.pid}")
        (tmp_path / f".idx.building-{dead_pid.pid}").mkdir()  # the build before versioning
        _publish(out, 1)
        assert sorted(_leftovers(out)) == [f".building-{sleeper.pid}"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_pre_versioning_crash_between_renames_is_recovered(tmp_path):
    out = tmp_path / "idx"
    dead = subprocess.Popen(["true"])
    dead.wait()
    # the old build moved the index aside and died before moving the new one in
    old = _write_plain(tmp_path / f".idx.old-{dead.pid}", 0)
    new = _publish(out, 1)
    assert verify(out).fingerprint == new
    assert [read_manifest(v).fingerprint for v in complete_versions(versions_dir(out))] == [old, new]


def test_a_second_build_of_the_same_index_is_refused_while_one_runs(tmp_path):
    out = tmp_path / "idx"
    _publish(out, 0)
    fd = os.open(versions_dir(out) / LOCK_FILE, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(IndexError_, match="another build"):
            _publish(out, 1)
    finally:
        os.close(fd)
    assert _leftovers(out) == []
    _publish(out, 1)
