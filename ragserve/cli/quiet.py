"""Keep a script's own output on the terminal and everything else in a log file
(``quiet``), or a command's data alone on stdout and everything else on stderr
(``data_stdout``, for ``--json``).

**Usage:**

    with quiet("build/demo.log", verbose=args.verbose) as q:
        if q.log:
            print(f"logs: {q.log}")
        main()  # print() still reaches the terminal; vLLM, torch, tqdm ... go to the log

vLLM's engine core is a child process that inherits file descriptors 1 and 2, and torch,
Triton and the NUMA code write to them from C, so configuring Python's logging is not
enough. Inside the block, fds 1 and 2 point at the log file, so the process, the children
it starts (forked or exec'd) and every library in them write there; ``sys.stdout`` is
swapped for a stream on a duplicate of the terminal's fd 1, so the program's own
``print()`` still reaches the user. ``sys.stderr`` stays on fd 2 (the log): warnings,
tracebacks logged by libraries and progress bars are noise by this definition;
``q.err`` is the terminal's stderr for the program's own error lines.

What stays the same: the streams' TTY-ness (``q.out.isatty()`` is the terminal's), so
colours and line buffering behave as without the block, and it works when stdout is a
pipe or a file. On exit, normal or not, fds 1 and 2, ``sys.stdout`` and the environment
are restored; an exception is written to the log, a one-line pointer to the log goes to
the terminal's stderr, and the exception propagates (its traceback reaches the terminal).
Children that outlive the block keep writing to the log.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

# Set for the block and restored after it. Children inherit them.
# vLLM's log handler binds a stream when vllm is first imported, and its default is
# sys.stdout: inside the block that would be the terminal. Its stderr is fd 2, the log.
_ENV = {"VLLM_LOGGING_STREAM": "ext://sys.stderr"}


@dataclass(frozen=True)
class Quiet:
    """What a ``quiet`` block hands the program: where the noise goes (None when verbose)
    and the terminal's streams for the program's own output."""

    log: Path | None
    out: TextIO
    err: TextIO


# The active block's original sys.stdout and terminal streams: a process forked inside
# the block (multiprocessing's default, vLLM's engine core) gets the original sys.stdout
# back, so its prints go to fd 1, the log, and not to the terminal stream it inherited.
_active: list[tuple[TextIO, TextIO, TextIO]] = []


def _flush_terminal() -> None:
    for stream in _active[-1][1:] if _active else ():
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _in_forked_child() -> None:
    if _active:
        sys.stdout = _active[-1][0]


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork to follow
    os.register_at_fork(before=_flush_terminal, after_in_child=_in_forked_child)


def _flush(*streams: TextIO | None) -> None:
    for s in streams:
        if s is not None:
            try:
                s.flush()
            except (OSError, ValueError):
                pass


def _restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _terminal_stream(fd: int, like: TextIO | None) -> TextIO:
    encoding = getattr(like, "encoding", None) or "utf-8"
    errors = getattr(like, "errors", None) or "strict"
    # Line-buffered like an interactive stdout; closefd=False: the block owns the fd.
    return open(fd, "w", buffering=1, encoding=encoding, errors=errors, closefd=False)  # noqa: SIM115


@contextmanager
def quiet(log_path: str | os.PathLike[str], *, verbose: bool = False, name: str | None = None) -> Iterator[Quiet]:
    """Send the process's and its children's fds 1 and 2 to ``log_path`` (truncated) for
    the block, keeping ``print()`` on the terminal. With ``verbose`` nothing changes and
    no log is written. ``name`` (default: the script's file name) is used in the log's
    header and in the pointer printed on failure."""
    if verbose:
        yield Quiet(None, sys.stdout, sys.stderr)
        return
    name = name or Path(sys.argv[0]).name or "python"
    log = Path(log_path).resolve()
    log.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    os.write(log_fd, f"== {name}: {' '.join(sys.argv)} (pid {os.getpid()}) at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
             .encode())
    _flush(sys.stdout, sys.stderr)
    saved_out, saved_err = os.dup(1), os.dup(2)  # not inheritable: exec'd children never see them
    old_stdout = sys.stdout
    old_env = {k: os.environ.get(k) for k in _ENV}
    out = _terminal_stream(saved_out, sys.__stdout__)
    err = _terminal_stream(saved_err, sys.__stderr__)
    failed: BaseException | None = None
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.environ.update(_ENV)
        sys.stdout = out
        _active.append((old_stdout, out, err))
        yield Quiet(log, out, err)
    except BaseException as e:
        failed = e
        raise
    finally:
        if _active and _active[-1][1] is out:
            _active.pop()
        sys.stdout = old_stdout
        _flush(out, err, sys.stdout, sys.stderr)  # what sys.stdout/stderr still held is noise: the log
        if failed is not None and not (isinstance(failed, SystemExit) and failed.code in (0, None)):
            with open(log_fd, "a", encoding="utf-8", errors="replace", closefd=False) as f:
                f.write(f"== {name} failed:\n")
                traceback.print_exception(failed, file=f)
            print(f"{name} failed ({type(failed).__name__}); what its libraries and child processes wrote "
                  f"until then is in {log}", file=err)
        else:
            os.write(log_fd, f"== {name}: done at {time.strftime('%H:%M:%S')}\n".encode())
        out.close()  # flushes; a write through a kept Quiet handle now raises, not lands in a reused fd
        err.close()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        _restore_env(old_env)


def _is_fd1(stream: TextIO) -> bool:
    try:
        return stream.fileno() == 1
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


@contextmanager
def data_stdout(enabled: bool = True) -> Iterator[TextIO]:
    """For a command whose stdout is data (``--json``): the block's data stream is the only
    writer to stdout. Fd 1 points at fd 2 for the block, and ``sys.stdout`` is
    ``sys.stderr``, so the process, its children (vLLM's engine core, forked or exec'd) and
    every library, from Python or C, write their lines to stderr; the stream it yields is
    on a duplicate of the original fd 1. Restored on exit, normal or not.

    Off (``enabled=False``), or when ``sys.stdout`` is not fd 1 (a test runner's capture),
    nothing moves and the block gets ``sys.stdout``."""
    if not enabled or not _is_fd1(sys.stdout):
        yield sys.stdout
        return
    _flush(sys.stdout, sys.stderr)
    saved_out = os.dup(1)  # not inheritable: exec'd children never see it
    old_stdout = sys.stdout
    old_env = {k: os.environ.get(k) for k in _ENV}
    data = _terminal_stream(saved_out, sys.__stdout__)
    try:
        os.dup2(2, 1)
        os.environ.update(_ENV)
        sys.stdout = sys.stderr
        _active.append((old_stdout, data, sys.stderr))
        yield data
    finally:
        if _active and _active[-1][1] is data:
            _active.pop()
        sys.stdout = old_stdout
        _flush(data, sys.stderr)
        data.close()
        os.dup2(saved_out, 1)
        os.close(saved_out)
        _restore_env(old_env)
