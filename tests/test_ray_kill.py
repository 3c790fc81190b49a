"""SIGKILL of a Ray actor, and of the ``--ray`` command itself, for ``batch --ray`` and
``build-index --ray`` (issue 28, "Process hygiene"): what the user gets, and that no process
of the command's tree is left within ``WAIT_S`` after it ends.

Each command runs as a process on a local cluster of its own (``testing/processes.ragserve_ray``:
a marker in its environment, a session of its own, the cluster's tree recorded while it
runs). An actor is found by its process title: Ray Data names its workers
``ray::MapWorker(MapBatches(CLASS))``. Generation is a fake OpenAI server in this process.

- ``batch --ray``: Ray Data starts its actors with ``max_restarts=-1`` and retries a task
  lost with its actor, so a killed answering actor is replaced, its batch answered again,
  and the run completes with each line answered once.
- ``build-index --ray``: the embedding actors have ``max_restarts=0`` (a slice that kills its
  actor is not retried for ever), so a killed one fails the build with a ClusterError
  naming the lost actor, and the previous index stays served and verifying.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from ragserve.build.builder import build_index
from ragserve.config import RAGConfig
from ragserve.index.verify import verify
from ragserve.ray.reaper import command_line
from ragserve.testing.fake_openai import Behaviour, FakeOpenAI
from ragserve.testing.http import running
from ragserve.testing.processes import marked, none_left, openai_env, ragserve_ray, titled
from ragserve.testing.waits import CLUSTER_WAIT_S, WAIT_S, eventually

pytestmark = [pytest.mark.integration, pytest.mark.ray]

START_S = 300  # a local cluster and its actors, each loading the embedding model, on 2 busy cores
ANSWERER = "MapBatches(Answerer)"
EMBEDDER = "MapBatches(ChunkEmbedder)"


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []



def _killed_and_nothing_left(proc: subprocess.Popen, marker: str) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=WAIT_S) == -signal.SIGKILL
    eventually(lambda: none_left(marker), WAIT_S, 0.2, "every process the command started to end",
               ignore=(AssertionError,))


def _log(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


def _batch(xquad_index: Path, xquad_corpus, tmp_path: Path) -> tuple[list[str], Path, list[str]]:
    asked = [q["question"] for q in xquad_corpus[1][:8]]
    questions, out = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n"
                                 for i, q in enumerate(asked)))
    # 2 actors x 2 questions at once, in batches of 4
    args = ["batch", str(xquad_index), str(questions), "--out", str(out), "--ray", "--ray-actors", "2",
            "--concurrency", "4"]
    return args, out, [f"q{i}" for i in range(len(asked))]


def test_batch_ray_answering_actor_killed_is_replaced_and_every_line_answered_once(
        xquad_index, xquad_corpus, tmp_path):
    args, out, ids = _batch(xquad_index, xquad_corpus, tmp_path)
    fake = FakeOpenAI(Behaviour(token_delay_s=0.01))
    with running(fake.app) as url, ragserve_ray(args, tmp_path, openai_env(url)) as (proc, log, marker):
        with fake.held():
            eventually(lambda: fake.in_flight == 4 or proc.poll() is not None, START_S, 0.1,
                       "each actor to have its lines in flight")
            assert proc.poll() is None, _log(log)
            first = titled(marker, ANSWERER)
            assert len(first) == 2, [(pid, command_line(pid)) for pid in marked(marker)]
            os.kill(first[0], signal.SIGKILL)
            # Ray restarts the actor and sends its batch again: its lines are in flight anew.
            eventually(lambda: set(titled(marker, ANSWERER)) - set(first) and fake.in_flight == 4,
                       CLUSTER_WAIT_S, 0.1, "a new answering actor with lines in flight")
        assert proc.wait(timeout=CLUSTER_WAIT_S) == 0, _log(log)
        records = _records(out)
        assert sorted(r["id"] for r in records) == ids  # each line once: none lost, none twice
        assert all(r.get("answer") and "error" not in r for r in records), records
        eventually(lambda: none_left(marker), WAIT_S, 0.2, "every process the run started to end",
                   ignore=(AssertionError,))


def test_batch_ray_sigkill_of_the_command_mid_run_leaves_nothing(xquad_index, xquad_corpus, tmp_path):
    args, out, _ = _batch(xquad_index, xquad_corpus, tmp_path)
    fake = FakeOpenAI(Behaviour(token_delay_s=0.01))
    with running(fake.app) as url, ragserve_ray(args, tmp_path, openai_env(url)) as (proc, log, marker):
        with fake.held():
            eventually(lambda: fake.in_flight > 0 or proc.poll() is not None, START_S, 0.1, "lines in flight")
            assert proc.poll() is None, _log(log)
            _killed_and_nothing_left(proc, marker)
    assert _records(out) == []


def test_build_ray_embedding_actor_killed_fails_typed_and_sigkill_leaves_the_previous_index(
        xquad_corpus, replay_embedder, embedder, tmp_path):
    src, out = tmp_path / "src", tmp_path / "idx"
    shutil.copytree(xquad_corpus[0], src)
    previous = build_index(src, out, RAGConfig(), embedder=replay_embedder).fingerprint
    (src / "added.txt").write_text("A paragraph the previous index does not have. " * 30, encoding="utf-8")
    # Slices of 8 chunks (embed.batch_size 1): both actors get work.
    args = ["build-index", str(src), "--out", str(out), "--ray", "--ray-actors", "2", "--full"]
    env = {"RAGSERVE_EMBED_BATCH_SIZE": "1"}

    with ragserve_ray(args, tmp_path, env) as (proc, log, marker):
        actor = eventually(lambda: titled(marker, EMBEDDER) or proc.poll() is not None, START_S, 0.02,
                           "an embedding actor")
        assert proc.poll() is None, _log(log)
        os.kill(actor[0], signal.SIGKILL)
        rc = proc.wait(timeout=CLUSTER_WAIT_S)
        if rc == 0:  # the build went on without it: it must be a clean build's index
            clean = build_index(src, tmp_path / "clean", RAGConfig().replace(embed={"batch_size": 1}),
                                embedder=embedder)
            assert verify(out).fingerprint == clean.fingerprint
        else:
            assert rc == 1, _log(log)
            said = " ".join(_log(log).split())  # rich wraps the line at 80 columns
            assert f"error [cluster] an embedding actor (pid {actor[0]}," in said, said
            assert verify(out).fingerprint == previous  # still served, and it verifies
        eventually(lambda: none_left(marker), WAIT_S, 0.2, "every process the build started to end",
                   ignore=(AssertionError,))
        built = verify(out).fingerprint

    with ragserve_ray(args, tmp_path, env) as (proc, log, marker):
        eventually(lambda: titled(marker, EMBEDDER) or proc.poll() is not None, START_S, 0.02,
                   "an embedding actor")
        assert proc.poll() is None, _log(log)
        _killed_and_nothing_left(proc, marker)
        assert verify(out, vectors="all").fingerprint == built
