"""ragserve.generators.lifeline: a child started under it ends when its parent ends, even by
SIGKILL, whether forked or spawned; and vLLM's engine-core entry point is the wrapper that
does it, by a name a spawned child can import. (The real engine core under a SIGKILLed
``ragserve serve``: tests/test_http_process.py.)"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ragserve.generators.lifeline import process
from ragserve.testing.waits import WAIT_S, eventually

ROOT = Path(__file__).resolve().parent.parent

PARENT = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from ragserve.generators import lifeline

    def child(out):
        lifeline.watch_parent()
        with open(out, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)

    if __name__ == "__main__":
        os.environ[lifeline.ENV] = str(os.getpid())
        p = multiprocessing.get_context(sys.argv[1]).Process(target=child, args=(sys.argv[2],))
        p.start()
        time.sleep(600)
""")


def alive(pid: int) -> bool:
    return process(pid) is not None


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_child_under_the_lifeline_dies_with_its_sigkilled_parent(tmp_path, method):
    script, out = tmp_path / "parent.py", tmp_path / "child.pid"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), method, str(out)], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        eventually(lambda: out.is_file() and out.read_text(), WAIT_S, 0.05, "the child to start")
        child = int(out.read_text())
        assert alive(child)
        parent.kill()  # SIGKILL: no handler, no atexit, no clean shutdown runs
        parent.wait(timeout=WAIT_S)
        eventually(lambda: not alive(child), WAIT_S, 0.05, "the orphaned child to end")
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_vllms_engine_core_entry_point_is_wrapped_once_by_an_importable_name(monkeypatch):
    from vllm.v1.engine.core import EngineCoreProc

    from ragserve.generators import lifeline

    monkeypatch.setenv(lifeline.ENV, "")  # restored after the test

    assert lifeline.bind_engine_cores() and lifeline.bind_engine_cores()  # idempotent
    assert EngineCoreProc.run_engine_core is lifeline.run_engine_core
    assert lifeline._original.__func__.__module__ == "vllm.v1.engine.core"  # not our own wrapper
    assert os.environ[lifeline.ENV] == str(os.getpid())
    # what a spawned child unpickles: a module-level function it imports by name
    assert pickle.loads(pickle.dumps(EngineCoreProc.run_engine_core)) is lifeline.run_engine_core


def test_without_a_parent_to_watch_nothing_is_started(monkeypatch):
    from ragserve.generators import lifeline

    monkeypatch.delenv(lifeline.ENV, raising=False)
    assert lifeline.watch_parent() is None and lifeline.watch_parent(1) is None


EXIT_FAST = textwrap.dedent("""
    import atexit, concurrent.futures, sys, threading, time
    from ragserve.generators.lifeline import exit_fast

    out = sys.argv[1]
    def late(name):
        time.sleep(0.3)  # still running when exit_fast is called
        open(out + name, "w").write("done")
    threading.Thread(target=late, args=(".thread",)).start()  # a non-daemon thread
    concurrent.futures.ThreadPoolExecutor(1).submit(late, ".pool")
    atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
    sys.stdout.write("buffered, no newline")
    exit_fast(3)
    open(out + ".after", "w").write("never")
""")


def test_exit_fast_ends_as_a_normal_exit_would_then_stops(tmp_path):
    """Threads joined, pools drained, atexit handlers run, stdout flushed, the status kept,
    and nothing after it runs."""
    out = str(tmp_path / "f")
    run = subprocess.run([sys.executable, "-c", EXIT_FAST, out], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert run.returncode == 3, run.stderr
    assert run.stdout == "buffered, no newline"
    assert {p.name for p in tmp_path.iterdir()} == {"f.thread", "f.pool", "f.atexit"}


@pytest.mark.parametrize(("code", "status"), [(0, 0), (None, 0), (1, 1)])
def test_a_spawned_engine_core_ends_a_clean_stop_fast_and_passes_a_failure_on(monkeypatch, code, status):
    """vLLM ends its engine core's loop with ``SystemExit``: in a spawned child a clean one
    (0 or None) goes to ``exit_fast``, a failure is raised on unchanged."""
    from vllm.v1.engine.core import EngineCoreProc

    from ragserve.generators import lifeline

    class Exited(BaseException):
        """exit_fast's stand-in: it never returns either."""

    def engine_core(*args, **kwargs):
        raise SystemExit(code)

    def exit_fast(status):
        raise Exited(status)

    monkeypatch.setattr(lifeline, "_original", None)  # spawned: vLLM's own entry point, imported
    monkeypatch.setattr(EngineCoreProc, "run_engine_core", staticmethod(engine_core))
    monkeypatch.setattr(lifeline, "watch_parent", lambda: None)
    monkeypatch.setattr(lifeline, "exit_fast", exit_fast)
    with pytest.raises(Exited if status == 0 else SystemExit) as e:
        lifeline.run_engine_core()
    assert e.value.args[0] == status if status == 0 else e.value.code == status


FORKED = textwrap.dedent("""
    import atexit, multiprocessing, sys
    from ragserve.generators import lifeline

    def clean_stop(*args, **kwargs):
        raise SystemExit(0)

    if __name__ == "__main__":
        atexit.register(lambda: print("parent's atexit ran", flush=True))
        lifeline._original = staticmethod(clean_stop)  # what bind_engine_cores leaves a forked child
        lifeline.watch_parent = lambda: None
        p = multiprocessing.get_context("fork").Process(target=lifeline.run_engine_core)
        p.start()
        p.join()
        print("child status", p.exitcode, flush=True)
""")


def test_a_forked_engine_core_does_not_run_its_parents_exit_handlers():
    """A forked child inherits its parent's atexit handlers (vLLM's finalizers among them):
    multiprocessing ends it with os._exit, and so must the wrapper, never exit_fast."""
    run = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["child status 0", "parent's atexit ran"], run.stdout
