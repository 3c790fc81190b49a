"""Versioned index folders: the path an index is served from always names a complete index.

Layout beside ``indexes/NAME``::

    indexes/NAME -> .NAME.v/20251129T050512.123456Z-3f2a9c1b7e4d    (relative symlink)
    indexes/.NAME.v/
        20251129T050512.123456Z-3f2a9c1b7e4d/    current version
        20251128T181002.000415Z-9d0c55e1a2b3/    previous version (kept)
        .building-12345/                         a build in progress, by process 12345
        .lock                                    held by the build that writes NAME

A build writes into ``.building-<pid>``, renames it to a version name (timestamp and
fingerprint) when it is complete, points a temporary symlink at it and ``os.replace``\\ s
that link over ``NAME``: one rename, so at every instant ``NAME`` names the old index or
the new one. An index folder from before versioning (a plain folder at ``NAME``) is
swapped for the link with Linux's ``renameat2(RENAME_EXCHANGE)``, also one step; where
the kernel or file system lacks it, the plain folder is moved into ``.NAME.v`` first and
the link created right after, and anyone opening ``NAME`` in between (or after a crash
there) is served the newest complete version (``resolve_index``).

Retention: after a flip the new version and the one it replaced are kept; older versions
are removed. A server that still has an older version open keeps reading it: its files
are memory-mapped or open, and an unlinked file lives until its last mapping closes. The
previous version stays on disk so that a server can still open it (or an operator point
``NAME`` back at it) until the next build. A version is removed by renaming it to
``.trash-*`` first, so a half-deleted version is never mistaken for a complete one.

Leftovers of a build that died (``.building-<pid>``, temporary links, ``.trash-*``, and
the ``.NAME.building-<pid>`` / ``.NAME.old-<pid>`` folders of the pre-versioning build)
are cleaned up by the next build; a folder of a process that is still alive is left alone
(a dead build's PID reused by a new process only delays that cleanup).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ragserve.errors import IndexError_, IndexWriteError

MANIFEST_FILE = "manifest.json"  # the name manifest.py writes; repeated to keep this module import-light
LOCK_FILE = ".lock"
_BUILDING = ".building-"
_TRASH = ".trash-"


def versions_dir(out: Path) -> Path:
    """``indexes/.NAME.v`` for ``indexes/NAME``."""
    return out.with_name(f".{out.name}.v")


def version_name(fingerprint: str) -> str:
    """A new version's folder name: UTC time to the microsecond (names sort by age), then
    the first 12 hex digits of the index fingerprint (which index it holds)."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1e6) % 1_000_000:06d}Z"
    return f"{stamp}-{fingerprint[:12]}"


def resolve_index(path: Path | str) -> Path:
    """The real folder that ``path`` names now, resolved once.

    Open an index through this (``read_manifest`` does): every file is then read from the
    version that was current at that moment, even if a build flips ``path`` meanwhile.
    If ``path`` names nothing but versions exist (a crash, or a migration on a file
    system without an atomic exchange, left the link missing), the newest complete version
    is served; the next build puts the link back. Otherwise ``path`` is returned as given,
    and the caller reports it missing.
    """
    path = Path(path)
    if path.is_dir():
        return Path(os.path.realpath(path))
    newest = newest_version(versions_dir(path))
    return Path(os.path.realpath(newest)) if newest is not None else path


def complete_versions(vdir: Path) -> list[Path]:
    """Published versions, oldest first (names sort by creation time)."""
    if not vdir.is_dir():
        return []
    return sorted(p for p in vdir.iterdir()
                  if not p.name.startswith(".") and p.is_dir() and (p / MANIFEST_FILE).is_file())


def newest_version(vdir: Path) -> Path | None:
    versions = complete_versions(vdir)
    return versions[-1] if versions else None


@contextmanager
def build_folder(out: Path) -> Iterator[Path]:
    """An empty folder to build the next version of ``out`` in; removed if the build fails.

    Holds ``.NAME.v/.lock`` while the folder is written and published (another build of
    the same index reaching this point meanwhile fails at once) and first cleans up what
    dead builds left. Call ``publish`` inside the block.
    """
    out = Path(out)
    vdir = versions_dir(out)
    vdir.mkdir(parents=True, exist_ok=True)
    with _lock(vdir, out):
        clean_leftovers(out)
        tmp = vdir / f"{_BUILDING}{os.getpid()}"
        _remove(tmp)
        tmp.mkdir()
        try:
            yield tmp
        finally:
            if tmp.exists():  # the build failed before publishing
                _remove(tmp)


def publish(out: Path, built: Path, fingerprint: str) -> Path:
    """Make the finished folder ``built`` the version ``out`` names; returns its real path.

    Steps, each atomic, each leaving ``out`` on the old index or the new one: rename
    ``built`` to its version name; create a temporary link to it; replace ``out`` by the
    link (or exchange them, when ``out`` is a plain folder from before versioning). Then
    versions other than the new one and the one it replaced are removed. An error before
    the flip leaves the old index and is raised; nothing after the flip fails the build.
    """
    out = Path(out)
    vdir = versions_dir(out)
    _fsync_tree(built)  # the rename must not publish files whose data a power cut could lose
    version = vdir / version_name(fingerprint)
    while version.exists():  # two builds within a microsecond: keep both apart
        version = version.with_name(version.name + "x")
    with IndexWriteError.during("rename", version):
        os.rename(built, version)
    try:
        _fsync(vdir)
        previous = _flip(out, version)
    except BaseException:
        if resolve_index(out) != Path(os.path.realpath(version)):
            _discard(version)
        raise
    keep = {version.name} | ({previous.name} if previous is not None else set())
    for old in complete_versions(vdir):
        if old.name not in keep:
            _discard(old)
    return version


def _flip(out: Path, version: Path) -> Path | None:
    """Point ``out`` at ``version``; returns the version it named before (None if none)."""
    vdir = versions_dir(out)
    link = out.with_name(f".{out.name}.link-{os.getpid()}")
    _remove(link)
    with IndexWriteError.during("link", link):
        os.symlink(f"{vdir.name}/{version.name}", link)
    try:
        if out.is_symlink() or not out.exists():
            before = Path(os.path.realpath(out)) if out.is_symlink() else None
            with IndexWriteError.during("rename", out):
                os.replace(link, out)
            return before if before is not None and before.parent == Path(os.path.realpath(vdir)) else None
        if not out.is_dir():
            raise IndexError_(out, "exists and is not an index folder or link; it is not replaced")
        return _migrate(out, link, vdir / _legacy_name(out))
    finally:
        if link.is_symlink():  # the flip did not happen (or the link is left from the fallback)
            _remove(link)


def _migrate(out: Path, link: Path, legacy: Path) -> Path:
    """Swap a plain index folder from before versioning for ``link`` in one step, and keep
    the folder as the previous version."""
    try:
        with IndexWriteError.during("rename", out):
            _exchange(link, out)
    except NotImplementedError:
        # NOTE: no atomic exchange here. Between these two renames ``out`` is missing;
        # resolve_index serves the newest complete version (the new one) meanwhile, and
        # the next build repairs the link if a crash lands in between.
        with IndexWriteError.during("rename", out):
            os.rename(out, legacy)
        try:
            with IndexWriteError.during("rename", out):
                os.replace(link, out)
        except BaseException:
            os.rename(legacy, out)
            raise
        return legacy
    try:
        os.rename(link, legacy)  # ``link`` now names the old plain folder
    except OSError:
        pass  # published all the same; clean_leftovers moves it at the next build
    return legacy


def _legacy_name(folder: Path) -> str:
    """A version name for a pre-versioning folder: its manifest's age, so it sorts older
    than any version built after it."""
    manifest = folder / MANIFEST_FILE
    when = (manifest if manifest.exists() else folder).stat().st_mtime
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(when)) + f".{int(when * 1e6) % 1_000_000:06d}Z"
    return f"{stamp}-migrated"


def _exchange(a: Path, b: Path) -> None:
    """Swap two directory entries atomically (Linux ``renameat2(RENAME_EXCHANGE)``).

    Raises NotImplementedError where the C library, kernel or file system lacks it.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise NotImplementedError("renameat2 is not available")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise NotImplementedError(os.strerror(err))
        raise OSError(err, os.strerror(err), str(a), None, str(b))


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what dead builds left around ``out`` and repair a missing link; returns the
    paths removed or moved. Call with the build lock held."""
    out = Path(out)
    vdir = versions_dir(out)
    done: list[Path] = []
    for p in sorted(vdir.iterdir()) if vdir.is_dir() else []:
        if p.name.startswith(_TRASH) or (p.name.startswith(_BUILDING) and not _alive(p.name)):
            _remove(p)
            done.append(p)
    prefix = f".{out.name}."
    for p in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        kind, _, pid = p.name[len(prefix):].rpartition("-") if p.name.startswith(prefix) else ("", "", "")
        if kind not in ("link", "building", "old") or _alive(pid):
            continue
        if kind == "link" and p.is_dir() and not p.is_symlink():
            # a pre-versioning folder swapped out by a migration that died before moving it
            os.rename(p, vdir / _legacy_name(p))
        elif kind == "old" and not out.exists() and not out.is_symlink() and (p / MANIFEST_FILE).is_file():
            # the pre-versioning build died between its two renames: this is the only index
            os.rename(p, out)
        else:
            _remove(p)
        done.append(p)
    newest = newest_version(vdir)
    if newest is not None and not out.exists():
        _flip(out, newest)  # a crash left no link (or a dangling one): the newest version again
        done.append(out)
    return done


def _alive(pid_text: str) -> bool:
    """Whether the process named by a leftover's PID suffix still runs (unparsable: no)."""
    try:
        pid = int(pid_text.rsplit("-", 1)[-1])
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # our own leftover from an earlier build in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@contextmanager
def _lock(vdir: Path, out: Path) -> Iterator[None]:
    import fcntl  # POSIX only; imported here so that ``import ragserve`` works everywhere

    fd = os.open(vdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexError_(out, "another build is writing this index; wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _discard(version: Path) -> None:
    """Remove a version: renamed to ``.trash-*`` first, so it is never half there."""
    trash = version.with_name(f"{_TRASH}{version.name}")
    try:
        os.rename(version, trash)
    except OSError:
        return  # kept; the next build tries again
    _remove(trash)


def _remove(path: Path) -> None:
    """Remove a file, link or folder; failures are left for the next build's cleanup
    (a failed cleanup must never fail a build or hide the error that caused it)."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except OSError:
        pass


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():  # the shard folders of a sharded index
            _fsync_tree(p)
        elif p.is_file():
            _fsync(p)
    _fsync(folder)


def _fsync(path: Path) -> None:
    """Flush a file's data (or a folder's entries) to disk; a failure (EIO: the data
    never reached it) raises ``IndexWriteError`` before anything is published."""
    with IndexWriteError.during("fsync", path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
