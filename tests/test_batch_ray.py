"""``ragserve batch --ray``: the questions answered by Ray Data actors on the session's local
Ray cluster (``ray_cluster``), with the real XQuAD index and MiniLM, generation by the
``openai`` backend against the fake OpenAI-compatible server in this process
(``fake_openai.py``, which refuses prompts with one word). The same with the real vLLM
engine in a generator deployment, serving two ``[models]`` that share it:
``test_real_engine_in_a_generator_deployment`` (markers ``engine`` and ``ray``).

The checks that need no cluster (the plan, refusals before any work) are unit tests here too.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from ragserve.config import RAGConfig
from ragserve.errors import BatchInputError, ClusterError, ConfigError, IndexNotFoundError, UnknownModelError
from ragserve.jobs.batch import answered_ids, run_batch
from ragserve.ray.batch import deployed_groups, plan_actors, run_batch_ray
from ragserve.testing.fake_openai import Behaviour, FakeOpenAI
from ragserve.testing.http import running

REFUSE = "REFUSE"
REPLY = "an answer from the fake server"
RECORD_KEYS = {"id", "question", "answer", "model", "cache_tier", "sources", "usage", "finish_reason", "timings"}


def config(url: str, **sections: dict) -> RAGConfig:
    return RAGConfig().replace(generate={"backend": "openai", "max_tokens": 16},
                               openai={"urls": [url], "tokenizer": "server"}, **sections)


def write_questions(path: Path, questions: list[str], refuse_at: int | None = None) -> list[tuple[str, str]]:
    items = [(f"q{i}", f"Please {REFUSE} to answer: {q}" if i == refuse_at else q)
             for i, q in enumerate(questions)]
    path.write_bytes(b"".join(orjson.dumps({"id": i, "question": q}) + b"\n" for i, q in items))
    return items


def records(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def fake():
    server = FakeOpenAI(Behaviour(refuse_word=REFUSE))
    with running(server.app) as url:
        server.url = url  # type: ignore[attr-defined]
        yield server


@pytest.fixture(scope="module")
def asked(xquad_corpus) -> list[str]:
    return [q["question"] for q in xquad_corpus[1][::17][:8]]


# -- on the cluster ------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.http
def test_every_question_answered_with_the_records_of_ragserve_batch(ray_cluster, xquad_index, embedder, fake,
                                                                   asked, tmp_path):
    from ragserve.rag import RAG

    questions, out, local_out = tmp_path / "q.jsonl", tmp_path / "ray.jsonl", tmp_path / "local.jsonl"
    items = write_questions(questions, asked, refuse_at=3)
    cfg = config(fake.url)
    seen, lines = [], []
    summary = run_batch_ray(xquad_index, questions, out, cfg, actors=2, concurrency=4,
                            on_start=lambda s: seen.append(("start", s.total, s.skipped)),
                            on_record=lambda r, s: seen.append((r["id"], s.done + s.failed)),
                            say=lines.append)
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (8, 7, 1, 0)
    assert seen[0] == ("start", 8, 0) and [n for _, n in seen[1:]] == list(range(1, 9))
    assert "2 actor(s) x 2 questions at once" in lines[0] and "openai backend in every actor" in lines[0]
    got = {r["id"]: r for r in records(out)}
    assert sorted(got) == sorted(i for i, _ in items) and len(records(out)) == 8  # each once
    # the refused question is its error record; every other one is answered
    failed = got.pop("q3")
    assert set(failed) == {"id", "question", "error"} and failed["question"] == items[3][1]
    assert failed["error"].startswith("GenerationError:") and "HTTP 400" in failed["error"]
    assert answered_ids(out) == set(got)

    # ragserve batch on the same file, in this process: the same records but for timings
    with RAG.from_index(xquad_index, cfg, embedder=embedder) as rag:
        import asyncio

        asyncio.run(run_batch(rag, questions, local_out, concurrency=4))
    local = {r["id"]: r for r in records(local_out)}
    assert set(local.pop("q3")) == set(failed)
    for qid, r in got.items():
        want = local[qid]
        assert set(r) == set(want) == RECORD_KEYS
        assert r["answer"] == want["answer"] == REPLY and r["cache_tier"] == want["cache_tier"] == "miss"
        assert [s["chunk_id"] for s in r["sources"]] == [s["chunk_id"] for s in want["sources"]]
        scores = [s["score"] for s in want["sources"]]
        # NOTE: not to the last digit: an actor embeds with one thread, this process with several
        assert [s["score"] for s in r["sources"]] == pytest.approx(scores, abs=1e-3)
        assert r["usage"] == want["usage"] and r["finish_reason"] == want["finish_reason"]
        assert set(r["timings"]) == set(want["timings"]) and r["timings"]["generate"] > 0


class Stop(Exception):
    """Stands for Ctrl-C in the driver."""


@pytest.mark.ray
@pytest.mark.http
def test_an_interrupted_run_resumes_without_asking_an_answered_question_again(ray_cluster, xquad_index, fake,
                                                                            asked, tmp_path):
    questions, out = tmp_path / "q.jsonl", tmp_path / "answers.jsonl"
    items = write_questions(questions, asked[:6])
    # an earlier `ragserve batch` answered q0 and failed q1, then crashed mid-write
    out.write_bytes(orjson.dumps({"id": "q0", "question": items[0][1], "answer": "earlier"}) + b"\n"
                    + orjson.dumps({"id": "q1", "question": items[1][1], "error": "TimeoutError: x"}) + b"\n"
                    + b'{"id": "q2", "question": "ha')
    cfg = config(fake.url)

    def stop_after_one(record, summary):
        if summary.done == 1:
            raise Stop

    asked_before = len(fake.bodies)
    with pytest.raises(Stop):
        run_batch_ray(xquad_index, questions, out, cfg, actors=1, concurrency=1, on_record=stop_after_one)
    first = records(out)  # the half-written line was cut off; one new answer, then the stop
    assert [r["id"] for r in first[:2]] == ["q0", "q1"] and len(first) == 3 and "answer" in first[2]

    summary = run_batch_ray(xquad_index, questions, out, cfg, actors=1, concurrency=2)
    assert (summary.total, summary.skipped, summary.done, summary.failed) == (6, 2, 4, 0)
    final = records(out)
    assert final[:3] == first and final[0]["answer"] == "earlier"
    assert sorted(r["id"] for r in final[3:]) == sorted({"q1", "q2", "q3", "q4", "q5"} - {first[2]["id"]})
    assert answered_ids(out) == {i for i, _ in items}
    # the interrupted run's lost batch is asked again; q0 and the first run's answer never are
    sent = [b["prompt"] for b in fake.bodies[asked_before:]]
    assert not any(" ".join(items[0][1].split()) in fake.text(p) for p in sent)
    assert sum(" ".join(first[2]["question"].split()) in fake.text(p) for p in sent) == 1


@pytest.mark.ray
@pytest.mark.http
def test_an_actor_that_cannot_start_fails_the_run_saying_why(ray_cluster, xquad_index, fake, asked, tmp_path):
    questions, out = tmp_path / "q.jsonl", tmp_path / "answers.jsonl"
    write_questions(questions, asked[:2])
    cfg = config(fake.url).replace(openai={"model": "not-served"})
    with pytest.raises(ClusterError) as e:
        run_batch_ray(xquad_index, questions, out, cfg, actors=1)
    assert re.fullmatch(r"\[cluster\] an answering actor could not start on \S+: ConfigError: \[config\] "
                        rf"openai.model: {fake.url} serves 'fake-model', not 'not-served'", str(e.value))
    assert not out.exists() or not records(out)


@pytest.mark.ray
@pytest.mark.http
def test_cli_batch_ray(ray_cluster, xquad_index, fake, asked, tmp_path, monkeypatch):
    from ragserve.cli.main import app

    questions, out = tmp_path / "q.jsonl", tmp_path / "answers.jsonl"
    items = write_questions(questions, asked[:4], refuse_at=1)
    lines = questions.read_bytes().splitlines()  # q2 asks the "long" model; the others get --model's
    lines[2] = orjson.dumps({"id": "q2", "question": items[2][1], "model": "long"})
    questions.write_bytes(b"\n".join(lines) + b"\n")
    # [models]: two openai models over the fake server, differing in max_tokens
    (tmp_path / "models.toml").write_text('[models]\n[models.short]\nmax_tokens = 4\n'
                                          '[models.long]\nmax_tokens = 12\n')
    monkeypatch.setenv("RAGSERVE_GENERATE_BACKEND", "openai")
    monkeypatch.setenv("RAGSERVE_OPENAI_URLS", fake.url)
    monkeypatch.setenv("RAGSERVE_OPENAI_TOKENIZER", "server")
    sent = len(fake.bodies)
    result = CliRunner().invoke(app, ["batch", str(xquad_index), str(questions), "--out", str(out),
                                      "--ray", "--ray-actors", "1", "--concurrency", "2", "--model", "short",
                                      "--config", str(tmp_path / "models.toml")])
    assert result.exit_code == 2, result.output  # one question failed: its line says why
    assert "done 3, failed 1, skipped 0 (already answered) of 4" in result.output
    assert "1 actor(s) x 2 questions at once" in result.output and "(2 models)" in result.output
    failed = {r["id"]: "error" in r for r in records(out)}
    assert failed == {"q0": False, "q1": True, "q2": False, "q3": False}
    assert {r["id"]: r["model"] for r in records(out) if "model" in r} == {"q0": "short", "q2": "long", "q3": "short"}
    assert sorted(b["max_tokens"] for b in fake.bodies[sent:]) == [4, 4, 4, 12]  # q1 is refused by the server


@pytest.mark.engine
@pytest.mark.ray
def test_real_engine_in_a_generator_deployment(ray_cluster, xquad_index, xquad_corpus, tmp_path):
    """vLLM in the generator deployment the run deploys (one replica, 1 CPU) and one actor
    (the other CPU); the application is gone after the run. Two ``[models]`` over the
    packaged SmolLM2 differ only in max_tokens, so they share that one deployment and
    engine; a line's own model wins over the run's. Run it alone, with the lock:
    ``flock /tmp/ragserve-engine.lock pytest -m "engine and ray" tests/test_batch_ray.py``."""
    from ray import serve

    questions, out = tmp_path / "q.jsonl", tmp_path / "answers.jsonl"
    asked = [q["question"] for q in xquad_corpus[1][::23][:5]]
    write_questions(questions, asked)
    with questions.open("ab") as f:  # the first two questions again, each asking the short model
        f.write(b"".join(orjson.dumps({"id": f"s{i}", "question": q, "model": "short"}) + b"\n"
                         for i, q in enumerate(asked[:2])))
    cfg = RAGConfig().replace(vllm={"kv_cache_gib": 1},
                              ray={"generator_num_cpus": 1, "app_name": "batch-engine"},
                              models={"long": {"max_tokens": 32}, "short": {"max_tokens": 4}})
    lines = []
    summary = run_batch_ray(xquad_index, questions, out, cfg, concurrency=8, model="long", say=lines.append)
    assert (summary.total, summary.done, summary.failed) == (7, 7, 0), records(out)
    deploying = [line for line in lines if "deploying the generator" in line]
    assert len(deploying) == 1 and "for 'long', 'short'" in deploying[0]  # one engine for both
    assert "1 actor(s) x 8 questions at once" in lines[-1]
    assert "generator deployment 'batch-engine-batch-" in lines[-1] and "for 'long', 'short'" in lines[-1]
    got = {r["id"]: r for r in records(out)}
    assert {i: r["model"] for i, r in got.items()} == {**{f"q{i}": "long" for i in range(5)}, "s0": "short",
                                                       "s1": "short"}
    for r in got.values():
        assert set(r) == RECORD_KEYS and r["answer"].strip() and r["cache_tier"] == "miss"
        assert 0 < r["usage"]["completion_tokens"] <= (4 if r["model"] == "short" else 32)
        assert r["usage"]["prompt_tokens"] > 100
        # vLLM's own stage split, carried back through the deployment
        assert r["timings"]["generate_first_token"] > 0 and r["timings"]["generate_decode"] >= 0
    for i in range(2):  # the same prompt, each model's own max_tokens (not its text: vLLM on a CPU is
        short, long = got[f"s{i}"], got[f"q{i}"]  # not batch-invariant, so greedy answers may differ)
        assert short["usage"]["prompt_tokens"] == long["usage"]["prompt_tokens"]
        assert short["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 4
        assert long["usage"]["completion_tokens"] > 4
    assert not [a for a in serve.status().applications if a.startswith("batch-engine")]


# -- without a cluster: what is refused or decided before any work -------------------------


def test_the_plan_splits_the_concurrency_over_the_actors():
    assert plan_actors(1000, 16, None, 2.0) == plan_actors(1000, 16, 2, 0.0)
    p = plan_actors(1000, 16, None, 2.0)
    assert (p.actors, p.per_actor, p.batch_size) == (2, 8, 32)
    p = plan_actors(3, 16, 8, 8.0)  # never more actors than questions; each gets a batch
    assert (p.actors, p.per_actor, p.batch_size) == (3, 6, 1)
    assert plan_actors(10, 4, None, 0.5).actors == 1  # no free CPU yet (an autoscaler adds some)
    with pytest.raises(ClusterError, match="--ray-actors must be >= 1"):
        plan_actors(10, 4, 0, 2.0)


def test_refused_before_any_cluster_starts(xquad_index, tmp_path, monkeypatch):
    import ragserve.ray.batch as batch_ray

    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(batch_ray, "ray_session", no_cluster)
    questions, out = tmp_path / "q.jsonl", tmp_path / "answers.jsonl"
    write_questions(questions, ["What is asked?", "And this?"])
    cfg = config("http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="cache.redis_url.*embedded"):
        run_batch_ray(xquad_index, questions, out, cfg.replace(cache={"redis_url": "embedded"}))
    with pytest.raises(BatchInputError, match="concurrency must be >= 1"):
        run_batch_ray(xquad_index, questions, out, cfg, concurrency=0)
    with pytest.raises(IndexNotFoundError):
        run_batch_ray(tmp_path / "no-index", questions, out, cfg)
    with pytest.raises(AssertionError, match="a cluster was started"):  # a vllm model is no longer refused
        run_batch_ray(xquad_index, questions, out, cfg.replace(models={"o": {}, "v": {"backend": "vllm"}}))
    with pytest.raises(UnknownModelError):
        run_batch_ray(xquad_index, questions, out, cfg.replace(models={"o": {}}), model="v")
    # every question already answered: nothing to do, no cluster
    answered = [orjson.dumps({"id": f"q{i}", "question": "x", "answer": "y"}) + b"\n" for i in range(2)]
    out.write_bytes(b"".join(answered))
    started = []
    summary = run_batch_ray(xquad_index, questions, out, cfg, on_start=started.append)
    assert (summary.total, summary.skipped, summary.done) == (2, 2, 0) and started == [summary]


def test_vllm_models_get_a_deployment_per_engine_and_openai_ones_none():
    """The groups of ``serve --ray`` (``generator_groups``): models that differ only in
    sampling share one deployment (one engine); another context length is another engine;
    an openai model is called from every actor, never deployed."""
    remote = {"backend": "openai", "openai": {"urls": ["http://127.0.0.1:9"]}}
    models = {"short": {"max_tokens": 4}, "long": {"max_tokens": 32, "temperature": 0.5},
              "wide": {"max_model_len": 1024}, "remote": remote, "default": "long"}
    cfg = RAGConfig().replace(models=models)
    assert deployed_groups(cfg) == [("RagserveGenerator", ("long", "short")),
                                    ("RagserveGenerator-wide", ("wide",))]
    assert deployed_groups(RAGConfig()) == [("RagserveGenerator", ())]  # the one [generate] model
    assert deployed_groups(config("http://127.0.0.1:9")) == []
    openai_models = config("http://127.0.0.1:9").replace(models={"o": {}, "p": {"max_tokens": 8}})
    assert deployed_groups(openai_models) == []


def test_cli_ray_options_need_ray(tmp_path):
    from ragserve.cli.main import app

    result = CliRunner().invoke(app, ["batch", str(tmp_path), str(tmp_path / "q.jsonl"), "--out",
                                      str(tmp_path / "o.jsonl"), "--ray-actors", "2"])
    assert result.exit_code == 2 and "need --ray" in result.output
