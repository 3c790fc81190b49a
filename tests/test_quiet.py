"""ragserve.cli.quiet: the noise of a process and of its children (exec'd and forked) goes to
the log file, the program's own lines to the real stdout, and a crash still reaches the
terminal. Each case runs a small program in a subprocess whose stdout and stderr are pipes
(not a TTY), so the test sees exactly what a user's terminal would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = textwrap.dedent("""
    import multiprocessing, os, subprocess, sys, warnings
    from ragserve.cli.quiet import quiet

    def forked():
        print("NOISE-FORK-PRINT", flush=True)  # vLLM's engine core is a forked child
        os.write(2, b"NOISE-FORK-FD2\\n")

    print("OWN-BEFORE", flush=True)
    with quiet(sys.argv[1], verbose=sys.argv[2] == "verbose", name="prog") as q:
        print(f"OWN-LOG {q.log}")
        subprocess.run([sys.executable, "-c",
                        "import os; os.write(1, b'NOISE-CHILD-FD1\\\\n'); os.write(2, b'NOISE-CHILD-FD2\\\\n')"],
                       check=True)
        p = multiprocessing.get_context("fork").Process(target=forked)
        p.start()
        p.join()
        os.write(1, b"NOISE-PARENT-FD1\\n")  # what torch or Triton write from C
        warnings.warn("NOISE-PARENT-WARNING")
        print("OWN-INSIDE", "tty" if sys.stdout.isatty() else "not-a-tty")
        if sys.argv[3] == "crash":
            raise RuntimeError("CRASH-INSIDE")
    print("OWN-AFTER", sys.stdout is sys.__stdout__, os.environ.get("VLLM_LOGGING_STREAM"))
    os.write(2, b"ERR-AFTER\\n")
""")

NOISE = ["NOISE-CHILD-FD1", "NOISE-CHILD-FD2", "NOISE-FORK-PRINT", "NOISE-FORK-FD2", "NOISE-PARENT-FD1",
         "NOISE-PARENT-WARNING"]


def run(tmp_path: Path, mode: str = "quiet", end: str = "ok") -> tuple[subprocess.CompletedProcess, Path]:
    script = tmp_path / "prog.py"
    script.write_text(PROGRAM)
    log = tmp_path / "logs" / "prog.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VLLM_LOGGING_STREAM", None)
    r = subprocess.run([sys.executable, str(script), str(log), mode, end], capture_output=True, text=True,
                       env=env, timeout=60, cwd=tmp_path)
    return r, log


def test_noise_goes_to_the_log_and_the_programs_lines_to_stdout(tmp_path):
    r, log = run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["OWN-BEFORE", f"OWN-LOG {log.resolve()}", "OWN-INSIDE not-a-tty",
                                     "OWN-AFTER True None"]
    assert r.stderr == "ERR-AFTER\n"  # fd 2 is the terminal's again after the block
    text = log.read_text()
    for noise in NOISE:
        assert noise in text, noise
    assert "OWN-" not in text
    assert text.startswith("== prog:") and text.splitlines()[-1].startswith("== prog: done at ")


def test_a_crash_reaches_the_terminal_with_a_pointer_to_the_log(tmp_path):
    r, log = run(tmp_path, end="crash")
    assert r.returncode == 1
    assert "OWN-INSIDE not-a-tty" in r.stdout and "OWN-AFTER" not in r.stdout
    assert (f"prog failed (RuntimeError); what its libraries and child processes wrote until then is in "
            f"{log.resolve()}\n") in r.stderr
    assert "Traceback (most recent call last)" in r.stderr and r.stderr.rstrip().endswith("RuntimeError: CRASH-INSIDE")
    assert not any(noise in r.stdout + r.stderr for noise in NOISE)
    text = log.read_text()
    assert all(noise in text for noise in NOISE)
    assert "== prog failed:" in text and "RuntimeError: CRASH-INSIDE" in text


def test_verbose_changes_nothing_and_writes_no_log(tmp_path):
    r, log = run(tmp_path, mode="verbose")
    assert r.returncode == 0, r.stderr
    assert "OWN-LOG None" in r.stdout and "OWN-AFTER True None" in r.stdout
    for noise in NOISE:
        assert noise in r.stdout + r.stderr, noise
    assert not log.exists()


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_the_programs_stdout_is_still_a_terminal_inside_the_block(tmp_path):
    """So rich keeps its colours and print() its line buffering under the block."""
    script = tmp_path / "prog.py"
    script.write_text(PROGRAM)
    leader, follower = os.openpty()
    try:
        r = subprocess.run([sys.executable, str(script), str(tmp_path / "p.log"), "quiet", "ok"], stdout=follower,
                           stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the writer side is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
    assert r.returncode == 0, r.stderr
    assert b"OWN-INSIDE tty" in seen and b"NOISE" not in seen


DATA_PROGRAM = textwrap.dedent("""
    import multiprocessing, os, subprocess, sys, warnings
    from ragserve.cli.quiet import data_stdout

    def forked():
        print("NOISE-FORK-PRINT", flush=True)
        os.write(1, b"NOISE-FORK-FD1\\n")

    with data_stdout(sys.argv[1] == "on") as data:
        print("NOISE-OWN-PRINT")  # a command's human lines: stderr under --json
        subprocess.run([sys.executable, "-c", "import os; os.write(1, b'NOISE-CHILD-FD1\\\\n')"], check=True)
        p = multiprocessing.get_context("fork").Process(target=forked)
        p.start()
        p.join()
        os.write(1, b"NOISE-PARENT-FD1\\n")  # what torch or vLLM's engine core write from C
        print("child saw", os.environ.get("VLLM_LOGGING_STREAM"), file=sys.stderr)
        data.buffer.write(b'{"data": 1}\\n')
    print("AFTER", sys.stdout is sys.__stdout__, os.environ.get("VLLM_LOGGING_STREAM"))
""")


def test_data_stdout_leaves_only_the_data_on_stdout_and_the_rest_on_stderr(tmp_path):
    script = tmp_path / "data.py"
    script.write_text(DATA_PROGRAM)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VLLM_LOGGING_STREAM", None)

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env,
                              timeout=60, cwd=tmp_path)

    on = run("on")
    assert on.returncode == 0, on.stderr
    assert on.stdout == '{"data": 1}\nAFTER True None\n'  # the block restores fd 1, sys.stdout and the env
    for noise in ("NOISE-OWN-PRINT", "NOISE-CHILD-FD1", "NOISE-FORK-PRINT", "NOISE-FORK-FD1",
                  "NOISE-PARENT-FD1"):
        assert noise in on.stderr, noise
    assert "child saw ext://sys.stderr" in on.stderr  # vLLM's handler, bound at its import, writes to stderr
    off = run("off")  # without --json nothing moves
    assert off.returncode == 0 and "NOISE-PARENT-FD1" in off.stdout and '{"data": 1}' in off.stdout
