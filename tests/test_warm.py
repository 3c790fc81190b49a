"""``ragserve warm``: a question log's distinct questions, most frequent first, into the L2
that ``ragserve serve`` reads, with resume. Unit tests of the plan and the worker loop;
integration tests on real MiniLM embeddings, real FAISS and a real Redis (embedded and
persisted under ``RAGSERVE_HOME``, as ``serve`` uses it), with a fake generator."""

import asyncio
import contextlib

import orjson
import pytest

from ragserve.cache.keys import normalize_question
from ragserve.cache.redis_server import free_port
from ragserve.config import RAGConfig, serve_config
from ragserve.engine.validation import check_question
from ragserve.errors import BatchInputError, InvalidParameterError, NoL2Error
from ragserve.jobs.batch import work_through
from ragserve.jobs.warm import WarmItem, plan_warm, run_warm, warm, warm_config
from ragserve.rag import RAG
from ragserve.testing.fakes import FakeGenerator
from ragserve.testing.redis import redis_server


def write_log(path, questions):
    """One line per asked question, as a service's log has them: ids unique, texts repeating."""
    path.write_bytes(b"".join(orjson.dumps({"id": f"r{i}", "question": q}) + b"\n" for i, q in enumerate(questions)))
    return path


def asked(gen, question):
    """How many generations a fake generator ran for ``question`` (its prompt holds it)."""
    return sum(question in p for p in gen.prompts)


# -- the plan and the loop (no models) ------------------------------------------------------------


def test_plan_dedups_by_the_cache_normalisation_most_frequent_first_ties_by_first_appearance():
    log = [("1", "b?"), ("2", "a?"), ("3", "  a?\t"), ("4", "c?"), ("5", "b?"),
           ("6", "\ufb01sh?"), ("7", "fish?"), ("8", "fish?  ")]  # U+FB01 "fi" ligature: NFKC makes it "fi"
    plan = plan_warm(log)
    assert plan.items == [WarmItem("fish?", 3, "6"), WarmItem("b?", 2, "1"), WarmItem("a?", 2, "2"),
                          WarmItem("c?", 1, "4")]
    assert (plan.lines, plan.distinct) == (8, 4)
    # the plan's text is the one the cache keys on, whatever spelling the log had
    assert {check_question(q, 1000) for _, q in log} == {i.question for i in plan.items}
    assert all(i.question == normalize_question(i.question) for i in plan.items)
    top = plan_warm(log, limit=2)
    assert [i.question for i in top.items] == ["fish?", "b?"] and top.distinct == 4
    assert len(plan_warm(log, limit=100).items) == 4
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InvalidParameterError, match="limit"):
            plan_warm(log, limit=bad)


async def test_work_through_bounds_concurrency_keeps_order_and_survives_a_failure():
    started, running, peak, results = [], [0], [0], {}

    async def work(i):
        started.append(i)
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.01 * (i % 3))
        running[0] -= 1
        if i == 3:
            raise RuntimeError("boom")
        return i * 10

    await work_through(list(range(10)), work, lambda i, r: results.setdefault(i, r), 3)
    assert started == list(range(10)) and peak[0] == 3
    assert isinstance(results.pop(3), RuntimeError)
    assert results == {i: i * 10 for i in range(10) if i != 3}
    with pytest.raises(BatchInputError, match="concurrency"):
        await work_through([1], work, lambda i, r: None, 0)


def test_warm_config_is_serve_config_with_l1_off_and_the_same_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGSERVE_HOME", str(tmp_path))
    cfg = warm_config(RAGConfig())
    served = serve_config(RAGConfig())
    assert cfg.cache.redis_url == served.cache.redis_url == "embedded"
    assert cfg.cache.redis_dir == served.cache.redis_dir == str(tmp_path / "redis")
    assert cfg.cache.l1_max_entries == 0 and cfg.cache.l2_timeout_ms >= 1000
    assert cfg.fingerprint() == served.fingerprint()  # the answer part of every key
    url = "redis://127.0.0.1:1/0"
    assert warm_config(RAGConfig().replace(cache={"redis_url": url})).cache.redis_url == url
    with pytest.raises(NoL2Error, match="cache.enabled"):
        warm_config(RAGConfig().replace(cache={"enabled": False}))


@pytest.fixture
def nothing_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("RAGSERVE_HOME", str(tmp_path / "home"))

    def refuse(*a, **kw):
        raise AssertionError("an index was opened before the input was refused")

    monkeypatch.setattr(RAG, "from_index", refuse)


def test_refusals_come_before_anything_loads(nothing_loads, tmp_path):
    log = write_log(tmp_path / "log.jsonl", ["fine?", "fine?"])
    with pytest.raises(NoL2Error, match="cache.enabled"):
        warm("unused", log, RAGConfig().replace(cache={"enabled": False}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine?"}\n{"question": \n')
    with pytest.raises(BatchInputError, match=r"bad.jsonl:2: not valid JSON"):
        warm("unused", bad, RAGConfig())
    write_log(bad, ["fine?", "   "])
    with pytest.raises(BatchInputError, match=r"id 'r1': the question is empty"):
        warm("unused", bad, RAGConfig())
    with pytest.raises(InvalidParameterError, match="namespace"):
        warm("unused", log, RAGConfig(), namespace="")
    with pytest.raises(InvalidParameterError, match="limit"):
        warm("unused", log, RAGConfig(), limit=0)
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(NoL2Error, match="does not answer"):
        warm("unused", log, RAGConfig().replace(cache={"redis_url": dead}))


def test_cli_refuses_a_cache_that_is_off(nothing_loads, tmp_path):
    from typer.testing import CliRunner

    from ragserve.cli import main as cli

    toml = tmp_path / "off.toml"
    toml.write_text("[cache]\nenabled = false\n")
    log = write_log(tmp_path / "log.jsonl", ["fine?"])
    result = CliRunner().invoke(cli.app, ["warm", "unused", str(log), "--config", str(toml)])
    assert result.exit_code == 1, result.output
    assert "cache.enabled: the answer cache is off" in result.output


# -- real embeddings, FAISS and Redis; a fake generator -------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty RAGSERVE_HOME: the embedded Redis of ``serve`` persists in ``home/redis``."""
    h = tmp_path / "h"
    monkeypatch.setenv("RAGSERVE_HOME", str(h))
    return h


@pytest.fixture
def log_questions(xquad_corpus):
    return [q["question"] for q in xquad_corpus[1][200:206]]  # asked by no other test


@pytest.mark.integration
@pytest.mark.redis
def test_warm_generates_each_distinct_question_once_and_a_server_then_hits_l2(home, tmp_path, xquad_index,
                                                                             embedder, log_questions):
    q = log_questions
    poison = "poison: which question fails?"
    # repeats, in other spellings too; q[5] is the most frequent, so it goes first
    asked_log = [q[0], q[5], q[1], f"  {q[5]} ", q[2], q[5], q[3], q[0].replace(" ", "\t"), poison, q[4]]
    log = write_log(tmp_path / "day1.jsonl", asked_log)
    gen = FakeGenerator(fail_on="poison")
    s = warm(xquad_index, log, RAGConfig(), concurrency=3, embedder=embedder, generator=gen)
    assert (s.lines, s.distinct, s.total) == (10, 7, 7)
    assert (s.warmed, s.already_warm, s.failed, s.not_stored) == (6, 0, 1, 0) and not s.ok
    assert [question for question, _ in s.failures] == [poison] and "RuntimeError: boom" in s.failures[0][1]
    assert [asked(gen, x) for x in q] == [1] * 6  # each distinct question generated once
    assert s.l2.startswith("unix://" + str(home / "redis")) and s.namespace == "default"
    assert (home / "redis" / "redis.sock").exists() is False  # warm stopped the server it started

    # Again (after a restart of the Redis, from its files): everything stored is already warm.
    gen2 = FakeGenerator(fail_on="poison")
    again = warm(xquad_index, log, RAGConfig(), concurrency=3, embedder=embedder, generator=gen2)
    assert (again.warmed, again.already_warm, again.failed) == (0, 6, 1)
    assert len(gen2.prompts) == 1 and poison in gen2.prompts[0]  # only the failed one was tried again

    # A fresh engine configured as `ragserve serve` is: L2 hits in every spelling, nothing generated.
    gen3 = FakeGenerator()
    with RAG.from_index(xquad_index, serve_config(RAGConfig()), embedder=embedder, generator=gen3) as server:
        tiers = [server.query(x).cache_tier for x in asked_log if x != poison]
        assert tiers[:3] == ["l2"] * 3 and set(tiers) <= {"l1", "l2"}  # repeats come from L1 once backfilled
        assert gen3.prompts == []
        assert server.query(q[0], namespace="tenant-a").cache_tier == "miss"  # another namespace is cold


@pytest.mark.integration
@pytest.mark.redis
def test_a_tenant_is_warmed_into_a_running_servers_redis(home, tmp_path, xquad_index, embedder, log_questions):
    log = write_log(tmp_path / "log.jsonl", log_questions[:3])
    gen = FakeGenerator()
    with RAG.from_index(xquad_index, serve_config(RAGConfig()), embedder=embedder, generator=gen) as server:
        s = warm(xquad_index, log, RAGConfig(), namespace="tenant-a", embedder=embedder,
                 generator=FakeGenerator())
        assert (s.warmed, s.failed, s.namespace) == (3, 0, "tenant-a")
        # warm joined the server's Redis and left it running: the server hits at once
        assert [server.query(x, namespace="tenant-a").cache_tier for x in log_questions[:3]] == ["l2"] * 3
        assert server.query(log_questions[0]).cache_tier == "miss"  # the default namespace was not warmed
        assert len(gen.prompts) == 1


@pytest.mark.integration
@pytest.mark.redis
def test_an_interrupted_warm_resumes_where_it_stopped(home, tmp_path, xquad_corpus, xquad_index, embedder):
    from ragserve.jobs.warm import load_plan

    questions = [q["question"] for q in xquad_corpus[1][210:218]]
    log = write_log(tmp_path / "log.jsonl", questions)
    cfg = warm_config(RAGConfig())
    plan = load_plan(log, cfg)
    first = FakeGenerator(delay=0.05)

    async def interrupted(rag):
        task = asyncio.current_task()

        def stop_after_three(summary):
            if summary.done == 3:
                task.cancel()  # like Ctrl-C: what is being generated now is lost

        with contextlib.suppress(asyncio.CancelledError):
            await run_warm(rag, plan, concurrency=2, on_done=stop_after_three)

    with RAG.from_index(xquad_index, cfg, embedder=embedder, generator=first) as rag:
        asyncio.run(interrupted(rag))
    second = FakeGenerator()
    s = warm(xquad_index, log, RAGConfig(), concurrency=2, embedder=embedder, generator=second)
    assert s.already_warm >= 3 and s.already_warm + s.warmed == 8 and s.ok
    assert s.warmed == len(second.prompts)
    assert all(asked(second, x) == 0 for x in questions[:3])  # the first three were done before the stop


@pytest.mark.integration
@pytest.mark.redis
def test_answers_redis_refuses_to_store_are_reported_not_counted_warm(tmp_path, xquad_index, embedder,
                                                                     log_questions):
    import redis

    with redis_server() as srv:
        raw = redis.Redis.from_url(srv.url)
        raw.config_set("maxmemory-policy", "noeviction")
        raw.config_set("maxmemory", 1)  # every SET is refused with an OOM reply; GET still works
        log = write_log(tmp_path / "log.jsonl", log_questions[:2])
        cfg = RAGConfig().replace(cache={"redis_url": srv.url})
        s = warm(xquad_index, log, cfg, embedder=embedder, generator=FakeGenerator())
        raw.close()
    assert (s.warmed, s.not_stored, s.failed) == (0, 2, 0) and not s.ok
    assert "OutOfMemoryError" in s.l2_error


@pytest.mark.integration
@pytest.mark.redis
def test_cli_warm_reports_exits_2_on_a_failure_and_0_once_all_are_warm(home, tmp_path, monkeypatch, xquad_index,
                                                                       embedder, log_questions):
    from typer.testing import CliRunner

    from ragserve.cli import main as cli

    from_index = RAG.from_index.__func__
    gens = []

    def with_fakes(cls, path, config=None, **kw):
        gens.append(FakeGenerator(fail_on="poison"))
        return from_index(cls, path, config, embedder=embedder, generator=gens[-1])

    monkeypatch.setattr(RAG, "from_index", classmethod(with_fakes))
    q = log_questions
    log = write_log(tmp_path / "log.jsonl", ["poison?", q[1], q[1], q[0], q[2], q[1], q[2]])
    first = CliRunner().invoke(cli.app, ["warm", str(xquad_index), str(log), "--json", "--limit", "3"])
    assert first.exit_code == 2, first.output
    assert "7 questions, 4 distinct; warming 3" in first.output
    assert "3 of 4 distinct questions: warmed 2, already warm 0, failed 1" in first.output
    report = orjson.loads(first.output.strip().splitlines()[-1])
    assert (report["distinct"], report["total"], report["warmed"], report["failed"]) == (4, 3, 2, 1)
    assert report["failures"][0]["question"] == "poison?" and asked(gens[0], q[0]) == 0  # q[0] is 4th: cut
    answers = tmp_path / "answers.jsonl"
    second = CliRunner().invoke(cli.app, ["warm", str(xquad_index), str(write_log(log, q[:3])),
                                          "--answers", str(answers)])
    assert second.exit_code == 0, second.output
    assert "3 distinct questions: warmed 1, already warm 2, failed 0" in second.output
    assert asked(gens[1], q[0]) == 1 and len(gens[1].prompts) == 1
    # --answers: what the service will serve for each question, the one generated now included
    rows = [orjson.loads(line) for line in answers.read_bytes().splitlines()]
    assert sorted(r["question"] for r in rows) == sorted(q[:3])
    assert sorted(r["cache_tier"] for r in rows) == ["l2", "l2", "miss"] and all(r["answer"] for r in rows)
