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
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


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
