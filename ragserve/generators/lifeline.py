"""vLLM's engine core dies with the process that started it, however that process ends.

``AsyncLLM`` runs the engine core in a child process. vLLM stops it on a clean shutdown, but
not when its parent is SIGKILLed (the OOM killer, ``kill -9``, a Ray worker torn down), and
not when SIGTERM reaches the whole process group while the engine core is still starting:
its handler then only logs, and the parent that would have killed it is gone. The orphan
keeps its memory (its KV cache: gigabytes; on a GPU node, the GPU's) and the next replica
cannot start.

So the engine core watches its parent itself. ``bind_engine_cores()``, called before
``AsyncLLM`` starts, wraps vLLM's engine-core entry point (``EngineCoreProc.run_engine_core``,
the target of the process vLLM starts) with ``run_engine_core`` below, which first starts a
daemon thread that blocks on a pidfd of the parent (``watch_parent``) and SIGKILLs its own
process the moment the parent ends. It works whether vLLM forks or spawns the child (a Ray
actor spawns): the wrapper is a module-level function, so a spawned child imports it by
name, and the parent's pid travels in ``RAGSERVE_ENGINE_PARENT``.

Not ``PR_SET_PDEATHSIG``: it fires when the *thread* that started the child ends, and the
engine may be started from a worker thread that ends long before the process does.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

log = logging.getLogger("ragserve.generate")

ENV = "RAGSERVE_ENGINE_PARENT"
"""The pid of the process whose engine core this is (set in the parent, inherited)."""
POLL_S = 0.5
"""Without pidfds (kernels before 5.3), how often the child checks its parent."""

_original: Any = None  # vLLM's run_engine_core, once wrapped (also seen by a forked child)


def bind_engine_cores() -> bool:
    """Make every engine core this process starts from now on die with it. Idempotent;
    False (with a warning) if this vLLM has no ``EngineCoreProc.run_engine_core`` to wrap."""
    global _original
    os.environ[ENV] = str(os.getpid())
    try:
        from vllm.v1.engine.core import EngineCoreProc
    except ImportError as e:  # another vLLM layout: its own clean shutdown is all there is
        log.warning("engine cores are not bound to their parent (%s)", e)
        return False
    current = EngineCoreProc.__dict__.get("run_engine_core")
    if current is None:
        log.warning("engine cores are not bound to their parent: this vLLM has no run_engine_core")
        return False
    if getattr(current, "__func__", None) is not run_engine_core:
        _original = current
        EngineCoreProc.run_engine_core = staticmethod(run_engine_core)
    return True


def run_engine_core(*args: Any, **kwargs: Any) -> Any:
    """vLLM's engine-core entry point, after ``watch_parent``. Runs in the child. A spawned
    child that vLLM has shut down cleanly (it ends its loop with ``SystemExit(0)``) ends with
    ``exit_fast``: its parent waits for it, and the interpreter's teardown of torch and vLLM
    would add about 2 s to every stop. A forked child is left as it is: multiprocessing ends
    it with ``os._exit`` already, and ``exit_fast`` there would run the atexit handlers and
    finalizers it inherited from its parent."""
    watch_parent()
    if _original is not None:  # forked: the parent's wrapped original
        return _original.__func__(*args, **kwargs)
    from vllm.v1.engine.core import EngineCoreProc  # spawned: a fresh import, never wrapped here

    try:
        return EngineCoreProc.run_engine_core(*args, **kwargs)
    except SystemExit as e:
        if e.code in (None, 0):
            exit_fast(0)
        raise


def exit_fast(code: int) -> NoReturn:
    """End this process as the interpreter would, then skip its teardown. Call it from the
    main thread. Non-daemon threads are joined and thread-pool executors shut down
    (``threading._shutdown``, what a normal exit runs first), atexit handlers run (Ray's
    disconnect, multiprocessing's finalizers, logging's flush) and the standard streams are
    flushed (a flush that fails makes status 0 into 120, as Python's own exit does); what is
    skipped is the interpreter freeing every module and object one by one, which after torch
    and vLLM are loaded takes about 2 s of CPU and gives back nothing the kernel does not take
    back at ``_exit``."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("exit_fast runs on the main thread: it joins the others")
    threading._shutdown()  # CPython's own first step of an exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except ValueError:  # closed
            pass
        except OSError:  # a closed pipe, a full disk: what Python's exit reports as 120
            code = code or 120
    os._exit(code)


class Proc(NamedTuple):
    """A live process as ``/proc/PID/stat`` gives it."""

    ppid: int
    pgrp: int
    start: int
    """Start time in clock ticks since boot (field 22 of stat): with the pid, it names one
    process (pids are reused)."""


def process(pid: int | str) -> Proc | None:
    """The live process ``pid``, from ``/proc``; None if it has ended. Zombies do not count:
    an orphan that has ended stays one until init reaps it, and holds nothing by then."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):  # ended meanwhile
        return None
    return None if fields[0] == "Z" else Proc(int(fields[1]), int(fields[2]), int(fields[19]))


def process_table() -> dict[int, Proc]:
    """Every live process of this machine (``process``)."""
    return {int(p.name): proc for p in Path("/proc").iterdir() if p.name.isdigit() and (proc := process(p.name))}


def pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (it turns readable when the process ends), or None where this
    kernel or Python has none. ProcessLookupError if it has ended already."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except (AttributeError, OSError):
        return None


def watch_parent(parent: int | None = None) -> threading.Thread | None:
    """In a child: SIGKILL this process as soon as ``parent`` (default: ``$RAGSERVE_ENGINE_PARENT``)
    ends, from a daemon thread. Returns the thread, or None without a parent to watch."""
    if parent is None:
        parent = int(os.environ.get(ENV) or 0)
    if parent <= 1:
        return None
    try:
        fd = pidfd(parent)  # None: poll
    except ProcessLookupError:  # gone before the child got here
        os.kill(os.getpid(), signal.SIGKILL)
        raise

    def wait() -> None:
        if fd is not None:
            select.select([fd], [], [])  # a pidfd turns readable when its process ends
        else:
            while os.getppid() == parent:
                time.sleep(POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    t = threading.Thread(target=wait, name="ragserve-lifeline", daemon=True)
    t.start()
    return t

