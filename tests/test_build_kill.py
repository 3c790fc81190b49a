"""``ragserve build-index`` killed with SIGKILL at each stage of a build (issue 28): while
embedding, with index.faiss written, with the docstore's lines written but not renamed,
between the docstore's two renames, before the first fsync, with the new version renamed
but not linked, and just after the flip. After each kill: the index the path names is the
old one (or, after the flip, the new one), it verifies (``verify-index`` exits 0) and
answers as before, and the same build run again completes, equals a clean build and
removes what the killed one left.

Each build runs in a process of its own, forked from one helper process that has already
imported ragserve and the chunker (a fresh interpreter per kill costs ~10 s here; a fork
costs milliseconds). The forked child runs the CLI's ``build-index`` command; the stage is
found by wrapping the call that starts (or ends) it: the child writes ``reached STAGE PID``
on a pipe and waits there, and the test kills it with SIGKILL. No sleep decides when.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragserve.build.builder import build_index
from ragserve.cli.main import app
from ragserve.errors import IndexNotFoundError
from ragserve.index.verify import verify
from ragserve.index.versions import versions_dir
from ragserve.testing.fakes import FakeEmbedder
from ragserve.testing.waits import WAIT_S
from tests.test_index_faults import OUT, _answers, _write_corpus

ZYGOTE = textwrap.dedent("""
    import json, os, signal, sys

    import ragserve.build.builder as builder
    import ragserve.index.versions as versions
    from ragserve.cli.main import app
    from ragserve.retrieval.faiss_index import FaissIndex
    from ragserve.testing.fakes import FakeEmbedder
    from llama_index.core.node_parser import SentenceSplitter

    SentenceSplitter(chunk_size=64, chunk_overlap=8).split_text("Warm the splitter. It loads lazily.")
    builder._embedder = lambda config: FakeEmbedder()
    proto = os.dup(1)

    def reached(stage):
        os.write(proto, f"reached {stage} {os.getpid()}\\n".encode())
        while True:
            signal.pause()  # until the SIGKILL

    def before(owner, name, stage, when=lambda *a: True):
        real = getattr(owner, name)
        def wrapped(*args, **kwargs):
            if when(*args):
                reached(stage)
            return real(*args, **kwargs)
        setattr(owner, name, wrapped)

    def after(owner, name, stage, when=lambda *a: True):
        real = getattr(owner, name)
        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            if when(*args):
                reached(stage)
            return out
        setattr(owner, name, wrapped)

    def hook(stage, out):
        base = lambda p: os.path.basename(os.fspath(p))
        if stage == "embedding":
            after(FakeEmbedder, "encode", stage)
        elif stage == "index-written":
            after(FaissIndex, "save", stage)
        elif stage == "lines-written":
            before(os, "replace", stage, lambda src, dst: base(src).startswith(".chunks.jsonl.tmp"))
        elif stage == "between-renames":
            before(os, "replace", stage, lambda src, dst: base(src).startswith(".chunks.offsets.npy.tmp"))
        elif stage == "fsync":
            before(os, "fsync", stage)
        elif stage == "renamed":
            before(os, "symlink", stage)
        elif stage == "flipped":
            after(os, "replace", stage, lambda src, dst: base(dst) == base(out))
        else:
            raise SystemExit(f"no such stage {stage}")

    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            hook(job["stage"], job["argv"][job["argv"].index("--out") + 1])
            try:
                app(job["argv"])
            except SystemExit as e:
                os._exit(e.code if isinstance(e.code, int) else 1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        signalled = os.WIFSIGNALED(status)
        done = {"pid": pid, "signal": os.WTERMSIG(status) if signalled else None,
                "code": None if signalled else os.WEXITSTATUS(status)}
        os.write(proto, (json.dumps(done) + "\\n").encode())
""")

STAGES = ["embedding", "index-written", "lines-written", "between-renames", "fsync", "renamed", "flipped"]
FULL_STAGES = ["embedding", "lines-written", "renamed"]
"""A full rebuild (--full) differs from an incremental one before the writer; after it, the
steps are the same (``tests/test_index_faults.py`` runs every step for both)."""


class Zygote:
    """The helper process: ``run(stage, argv)`` forks a build that stops at ``stage``."""

    def __init__(self, log: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.log = log
        self.err = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, env=env, text=True, bufsize=1,
                                     start_new_session=True)  # its builds are in its process group
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("")  # ended

    def next_line(self, what: str) -> str:
        try:
            line = self.lines.get(timeout=WAIT_S * 4)  # the first job waits for the imports
        except queue.Empty:
            raise AssertionError(f"no {what} within {WAIT_S * 4:.0f} s; "
                                 f"log: {self.log.read_text()[-2000:]}") from None
        assert line, f"the helper process ended; log: {self.log.read_text()[-2000:]}"
        return line

    def kill_at(self, stage: str, argv: list[str]) -> dict:
        self.proc.stdin.write(json.dumps({"stage": stage, "argv": argv, "log": str(self.log)}) + "\n")
        self.proc.stdin.flush()
        line = self.next_line(f"'reached {stage}'")
        assert line.startswith(f"reached {stage} "), (line, self.log.read_text()[-2000:])
        pid = int(line.rsplit(" ", 1)[1])
        os.kill(pid, signal.SIGKILL)
        result = json.loads(self.next_line("exit status"))
        assert result["pid"] == pid and result["signal"] == signal.SIGKILL, result
        return result

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=WAIT_S)
        finally:
            # a build a failed test left waiting at its stage, and the helper if it is still up
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.err.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote") / "builds.log")
    try:
        yield z
    finally:
        z.close()


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    src = tmp_path_factory.mktemp("clean-kill") / "src"
    _write_corpus(src, 5)
    return build_index(src, src.parent / OUT, embedder=FakeEmbedder()).fingerprint


def _leftovers(out: Path) -> list[str]:
    vdir = versions_dir(out)
    extra = [p.name for p in vdir.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    return extra + [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p != vdir]


@pytest.mark.parametrize(("stage", "full"), [(s, False) for s in STAGES] + [(s, True) for s in FULL_STAGES],
                         ids=[f"{s}-incremental" for s in STAGES] + [f"{s}-full" for s in FULL_STAGES])
def test_a_build_killed_at_each_stage_leaves_a_served_index_and_the_rerun_completes(
        tmp_path, zygote, clean, stage, full):
    src, out = tmp_path / "src", tmp_path / OUT
    _write_corpus(src, 4)
    before = build_index(src, out, embedder=FakeEmbedder())
    old_answers = _answers(out)
    _write_corpus(src, 5)
    zygote.kill_at(stage, ["build-index", str(src), "--out", str(out), *(["--full"] if full else [])])

    now = verify(out).fingerprint
    if stage == "flipped":
        assert now == clean  # the flip happened: the new index, whole
    else:
        assert now == before.fingerprint and _answers(out) == old_answers
    result = CliRunner().invoke(app, ["verify-index", str(out)])
    assert result.exit_code == 0, result.output

    again = build_index(src, out, embedder=FakeEmbedder(), full=full)
    assert again.fingerprint == clean == verify(out).fingerprint
    assert _leftovers(out) == []


def test_a_first_build_killed_leaves_no_index_and_the_rerun_completes(tmp_path, zygote, clean):
    src, out = tmp_path / "src", tmp_path / OUT
    _write_corpus(src, 5)
    zygote.kill_at("renamed", ["build-index", str(src), "--out", str(out)])
    # a complete version was renamed into place but never linked: it is served (resolve_index),
    # and the next build puts the link back
    assert verify(out).fingerprint == clean
    assert CliRunner().invoke(app, ["verify-index", str(out)]).exit_code == 0
    assert build_index(src, out, embedder=FakeEmbedder()).fingerprint == clean
    assert out.is_symlink() and _leftovers(out) == []

    other = tmp_path / "other"
    zygote.kill_at("lines-written", ["build-index", str(src), "--out", str(other)])
    with pytest.raises(IndexNotFoundError):
        verify(other)
    assert build_index(src, other, embedder=FakeEmbedder()).fingerprint == clean
    assert _leftovers(other) == []
