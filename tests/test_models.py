"""A choice of model per request (``[models]``): config, keys and single-flight per model,
the auto route, unknown models, and the HTTP routes over a real loopback server (fakes
behind it; the real engine: ``test_models_engine.py``)."""

import asyncio

import httpx
import openai
import pytest

from ragserve import UnknownModelError
from ragserve.config import RAGConfig
from ragserve.engine.models import route_signal
from ragserve.errors import ConfigError
from ragserve.server.app import create_app
from ragserve.testing.fakes import FakeGenerator, WordsEmbedder, fake_rag, opening
from ragserve.testing.http import running
from ragserve.testing.waits import HTTP_TIMEOUT_S, aeventually

TWO = {"small": {"max_tokens": 16}, "large": {"max_tokens": 48}, "default": "small"}


def two_models(tmp_path, **models):
    gens = {"small": FakeGenerator(words=1), "large": FakeGenerator(words=3)}
    cfg = RAGConfig().replace(prompt={"max_score_gap": 0}, models={**TWO, **models})
    return fake_rag(tmp_path, config=cfg, generators=gens, embedder=WordsEmbedder()), gens


# -- config ------------------------------------------------------------------------------

def test_models_load_from_toml_tables_and_env_and_survive_to_dict(tmp_path):
    path = tmp_path / "ragserve.toml"
    path.write_text('[generate]\nmax_tokens = 64\n[models]\ndefault = "small"\n'
                    '[models.small]\nmax_tokens = 16\n'
                    '[models.remote]\nbackend = "openai"\n'
                    'openai = { urls = ["http://gpu-1:8000"], model = "big" }\n')
    cfg = RAGConfig.load(path, env={"RAGSERVE_MODELS_DEFAULT": "remote"})
    assert cfg.models.names == ("small", "remote") and cfg.models.default_name == "remote"
    assert cfg.model_config("small").generate.max_tokens == 16
    remote = cfg.model_config("remote")
    assert remote.generate.backend == "openai" and remote.openai.urls == ("http://gpu-1:8000",)
    assert remote.generate.max_tokens == 64  # what a model does not set comes from [generate]
    assert RAGConfig().replace(**cfg.to_dict()) == cfg  # Ray passes configs as dicts
    assert len({cfg.fingerprint(), cfg.model_fingerprint("small"), cfg.model_fingerprint("remote")}) == 3
    assert RAGConfig.load(env={}).fingerprint() == RAGConfig().fingerprint()  # no [models]: as before


@pytest.mark.parametrize("models, field", [
    ({"small": {"max_tokens": 0}}, "models.small.max_tokens"),
    ({"small": {"colour": "red"}}, "models.small.colour"),
    ({"small": {"backend": "openai"}}, "models.small.openai.urls"),
    ({"small": {}, "default": "large"}, "models.default"),
    ({"small": {}, "large": {}, "route": "auto", "route_small": "small"}, "models.route"),
    ({"auto": {}}, "models.auto"),
    ({"route": "sometimes"}, "models.route"),
])
def test_bad_models_config_names_the_field(models, field):
    with pytest.raises(ConfigError) as e:
        RAGConfig().replace(models=models)
    assert e.value.field == field


# -- the engine --------------------------------------------------------------------------

def test_each_model_answers_with_its_own_generator_and_cache_entries(tmp_path):
    rag, gens = two_models(tmp_path)
    with rag:
        q = "chunk number 3"
        small = rag.query(q)  # the default
        large = rag.query(q, model="large")
        assert (small.model, small.cache_tier) == ("small", "miss")
        assert (large.model, large.cache_tier) == ("large", "miss")
        assert small.answer != large.answer  # each its own generator
        assert len(gens["small"].prompts) == len(gens["large"].prompts) == 1
        again = rag.query(q, model="small"), rag.query(q, model="large")
        assert [(r.model, r.cache_tier) for r in again] == [("small", "l1"), ("large", "l1")]
        assert again[1].answer == large.answer
        assert rag.cache.stats()["l1"]["entries"] == 2
        assert rag.stats()["models"]["large"]["max_tokens"] == 48


def test_an_unknown_model_is_refused_before_any_work(tmp_path):
    rag, gens = two_models(tmp_path)
    with rag:
        calls = rag.embedder.texts[:]
        for bad in ("medium", "", 3, "ragserve"):
            with pytest.raises(UnknownModelError) as e:
                rag.query("chunk number 3", model=bad)
            assert e.value.known == ("small", "large")
        assert rag.embedder.texts == calls and not gens["small"].prompts and not gens["large"].prompts
        assert rag.stats()["errors"] == 4  # each refusal counted, as any bad input is


def test_without_models_a_model_other_than_the_served_one_is_refused(tmp_path):
    with fake_rag(tmp_path) as rag:
        assert rag.query("chunk number 1").model == "fake-llm"
        assert rag.query("chunk number 1", model="fake-llm").cache_tier == "l1"
        with pytest.raises(UnknownModelError):
            rag.query("chunk number 1", model="large")


async def test_single_flight_is_per_model(tmp_path):
    rag, gens = two_models(tmp_path)
    with rag:
        for g in gens.values():
            g.hold = True
        tasks = [asyncio.ensure_future(rag.aquery("chunk number 5", model=m)) for m in ("small", "large") * 3]
        await aeventually(lambda: gens["small"].running == 1 and gens["large"].running == 1,
                          what="one run per model in flight")
        for g in gens.values():
            g.hold = False
        results = await asyncio.gather(*tasks)
        assert len(gens["small"].prompts) == len(gens["large"].prompts) == 1
        assert sorted((r.model, r.shared) for r in results) == [
            (m, shared) for m in ("large", "small") for shared in (False, True, True)]
        assert rag.stats()["single_flight"]["runs"] == 2


def test_auto_route_sends_hard_questions_to_the_large_model(tmp_path):
    rag, gens = two_models(tmp_path, route="auto", route_small="small", route_large="large",
                           route_threshold=0.8)
    with rag:
        easy, hard = "alpha", "one two three four"
        top = {q: route_signal("top_score", rag.retrieve(q)) for q in (easy, hard)}
        assert top[easy] >= 0.8 > top[hard]
        assert rag.query(easy).model == "small" and rag.query(hard).model == "large"
        assert len(gens["small"].prompts) == len(gens["large"].prompts) == 1
        # stored under the routed key and the pick's own: asking for either is a hit
        assert rag.query(easy).cache_tier == "l1" and rag.query(easy, model="auto").cache_tier == "l1"
        assert rag.query(easy, model="small").cache_tier == "l1"
        assert rag.query(easy, model="large").cache_tier == "miss"


def test_score_gap_signal():
    from ragserve.types import Source

    def src(score):
        return Source("d", 0, score, "t")

    assert route_signal("score_gap", [src(0.9), src(0.5)]) == pytest.approx(0.4)
    assert route_signal("top_score", [src(0.5), src(0.9)]) == 0.9
    assert route_signal("score_gap", []) == float("-inf")


def test_models_that_differ_only_in_sampling_share_one_vllm_engine(tmp_path):
    from ragserve.generators import make_generators
    from ragserve.generators.vllm import VllmGenerator

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    cfg = RAGConfig().replace(generate={"model": str(folder)}, models={
        "short": {"max_tokens": 8}, "long": {"max_tokens": 128, "temperature": 0.7},
        "wide": {"max_model_len": 4096}, "remote": {"backend": "openai", "openai": {"urls": ["http://h:1"]}}})
    gens = make_generators({n: cfg.model_config(n) for n in cfg.models.names})
    assert gens["short"].owner is None and gens["long"].owner is gens["short"]
    assert gens["long"].config.max_tokens == 128 and gens["long"].config.temperature == 0.7
    assert isinstance(gens["wide"], VllmGenerator) and gens["wide"].owner is None  # another engine
    assert type(gens["remote"]).__name__ == "OpenAIGenerator"
    gens["long"].shutdown()  # a view never stops its owner's engine (none started here)
    assert not gens["long"].alive() and gens["short"]._engine is None


# -- HTTP --------------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path):
    rag, gens = two_models(tmp_path)
    with rag, running(create_app(rag, rag.config)) as url:
        yield url, rag, gens


def test_v1_models_lists_the_configured_models_over_http_and_the_sdk(served):
    url, _, _ = served
    body = httpx.get(f"{url}/v1/models", timeout=HTTP_TIMEOUT_S).json()
    assert [m["id"] for m in body["data"]] == ["small", "large"]
    assert body["data"][0]["default"] is True and body["data"][1]["max_tokens"] == 48
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=HTTP_TIMEOUT_S)
    assert [m.id for m in client.models.list()] == ["small", "large"]


def test_native_model_field_and_unknown_model_400(served):
    url, _, gens = served
    query = f"{url}/v1/query"
    r = httpx.post(query, json={"question": "chunk number 2", "model": "large"}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200 and r.json()["model"] == "large" and len(gens["large"].prompts) == 1
    for bad in ("medium", 7):
        r = httpx.post(query, json={"question": "chunk number 2", "model": bad}, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 400 and r.json()["error"]["type"] == "UnknownModelError", r.text
    assert "'small', 'large'" in r.json()["error"]["message"]


def test_openai_chat_picks_the_model_and_unknown_is_404_in_openai_shape(served):
    url, _, gens = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=HTTP_TIMEOUT_S)
    messages = [{"role": "user", "content": "chunk number 4"}]
    r = client.chat.completions.create(model="large", messages=messages)
    assert r.model == "large" and r.choices[0].message.content == "an answer more"
    assert client.chat.completions.create(model="ragserve", messages=messages).model == "small"
    chunks = list(client.chat.completions.create(model="large", messages=messages, stream=True))
    assert {c.model for c in chunks} == {"large"}
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=messages)
    error = e.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-4o" in error["message"]
    assert error["type"] == "ModelNotFound" and "'small', 'large', 'ragserve'" in error["message"]
    # a model's own sampling: large generates up to 48 tokens, so 16 is refused for it only
    assert client.chat.completions.create(model="small", messages=messages, max_tokens=16).model == "small"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="large", messages=messages, max_tokens=16)


def test_the_client_asks_for_a_model_and_gets_the_typed_error_back(served):
    from ragserve import Client

    url, _, gens = served
    with Client(url) as client:
        assert client.query("chunk number 6", model="large").model == "large"
        assert [e.result.model for e in client.stream("chunk number 6", model="small") if hasattr(e, "result")] == [
            "small"]
        with pytest.raises(UnknownModelError) as e:
            client.query("chunk number 6", model="medium")
        assert e.value.status == 400


# -- the command line and MCP --------------------------------------------------------------

MODELS_TOML = '[models]\ndefault = "small"\n[models.small]\nmax_tokens = 16\n[models.large]\nmax_tokens = 48\n'


@pytest.fixture
def cli_rag(tmp_path, monkeypatch):
    """(invoke, rag, gens, opened): ``ragserve ...`` in process with ``--config`` naming the
    two models, over the two-model fake RAG in place of ``RAG.from_index``."""

    from typer.testing import CliRunner

    from ragserve.cli import main as cli

    rag, gens = two_models(tmp_path / "index")
    config = tmp_path / "ragserve.toml"
    config.write_text(MODELS_TOML)
    opened = opening(monkeypatch, rag)

    def invoke(*args):
        return CliRunner().invoke(cli.app, [*map(str, args), "--config", str(config)])

    with rag:
        yield invoke, rag, gens, opened


def test_cli_query_picks_the_model_and_refuses_an_unknown_one_before_the_engine_opens(cli_rag):
    import json

    invoke, _, gens, opened = cli_rag
    r = invoke("query", "idx", "chunk number 3", "--model", "large", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == "large" and len(gens["large"].prompts) == 1
    r = invoke("query", "idx", "chunk number 3")
    assert r.exit_code == 0 and "model small" in r.stdout and len(gens["small"].prompts) == 1
    bad = invoke("query", "idx", "chunk number 3", "--model", "medium")
    assert bad.exit_code == 1 and opened == ["idx", "idx"]  # refused before the engine opened
    assert "model 'medium' is not served here; served: 'small', 'large'" in bad.output


def test_cli_batch_takes_a_model_per_line_over_the_runs_and_checks_them_all_first(cli_rag, tmp_path):
    import orjson

    invoke, _, gens, opened = cli_rag
    questions, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    questions.write_bytes(b'{"id": "a", "question": "chunk number 1"}\n'
                          b'{"id": "b", "question": "chunk number 2", "model": "small"}\n'
                          b'"chunk number 4"\n')
    r = invoke("batch", "idx", questions, "--out", out, "--model", "large")
    assert r.exit_code == 0, r.output
    got = {rec["id"]: rec["model"] for rec in map(orjson.loads, out.read_bytes().splitlines())}
    assert got == {"a": "large", "b": "small", "3": "large"}
    assert len(gens["large"].prompts) == 2 and len(gens["small"].prompts) == 1
    questions.write_bytes(b'{"id": "c", "question": "chunk number 5", "model": "medium"}\n')
    bad = invoke("batch", "idx", questions, "--out", out)
    assert bad.exit_code == 1 and "model 'medium' is not served here" in bad.output
    questions.write_bytes(b'{"id": "c", "question": "chunk number 5", "model": 7}\n')
    bad = invoke("batch", "idx", questions, "--out", out)
    assert bad.exit_code == 1 and '"model" must be a string' in bad.output
    assert opened == ["idx"]  # neither bad file opened the engine


def test_cli_warm_and_stats_refuse_an_unknown_model_before_anything_loads(cli_rag, tmp_path):
    invoke, _, gens, opened = cli_rag
    questions = tmp_path / "q.jsonl"
    questions.write_text('"chunk number 1"\n')
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "manifest.json").write_text("{}")
    for args in (("warm", "idx", questions, "--model", "medium", "--redis-url", "redis://127.0.0.1:1/0"),
                 ("stats", tmp_path / "idx", "--model", "medium")):
        r = invoke(*args)
        assert r.exit_code == 1 and "model 'medium' is not served here" in r.output, r.output
    assert opened == []
    r = invoke("stats", tmp_path / "idx", "--model", "large", "--questions", "2", "--concurrency", "1",
               "--repeat-share", "0", "--json")
    assert r.exit_code == 0, r.output
    assert len(gens["large"].prompts) == 2 and not gens["small"].prompts  # the workload asked the large one


def test_cli_eval_answers_with_the_named_model_and_refuses_an_unknown_one_before_anything_starts(
        cli_rag, tmp_path, monkeypatch):
    import orjson

    import ragserve.retrieval.embed as embed

    invoke, _, gens, opened = cli_rag
    monkeypatch.setattr(embed, "SentenceTransformerEmbedder", lambda cfg: WordsEmbedder())
    (tmp_path / "idx").mkdir()
    questions = tmp_path / "questions.json"
    questions.write_bytes(orjson.dumps({"name": "chunks", "questions": [
        {"question": f"chunk number {i}", "answers": [f"chunk number {i}"], "relevant": [f"doc{i}.txt"]}
        for i in range(3)]}))
    report = tmp_path / "report.json"
    r = invoke("eval", questions, "--index", tmp_path / "idx", "--answers", "--model", "large",
               "--json", report)
    assert r.exit_code == 0, r.output
    assert "generation by model large (3 questions" in " ".join(r.output.split())
    assert "model asked for: large" in r.output
    data = orjson.loads(report.read_bytes())
    assert data["config"]["model"] == "large" and data["answers"]["models"] == {"large": 3}
    assert [q["model"] for q in data["per_question"]] == ["large"] * 3
    assert len(gens["large"].prompts) == 3 and not gens["small"].prompts  # answered by the large one
    assert opened == [str(tmp_path / "idx")]
    r = invoke("eval", questions, "--index", tmp_path / "idx", "--answers", "--json", report)
    assert r.exit_code == 0, r.output
    data = orjson.loads(report.read_bytes())  # none named: the default answers, and the report says so
    assert data["config"]["model"] is None and data["answers"]["models"] == {"small": 3}
    assert "generation by model small" in r.output and len(gens["small"].prompts) == 3
    bad = invoke("eval", questions, "--index", tmp_path / "idx", "--answers", "--model", "medium")
    assert bad.exit_code == 1 and len(opened) == 2  # refused before the engine opened
    assert "model 'medium' is not served here; served: 'small', 'large'" in bad.output
    alone = invoke("eval", questions, "--index", tmp_path / "idx", "--model", "large")
    assert alone.exit_code == 2 and "goes with --answers" in alone.output and len(opened) == 2


@pytest.mark.redis
def test_warm_fills_the_named_models_own_cache_entries(tmp_path):
    from ragserve.jobs.warm import plan_warm, run_warm
    from ragserve.testing.redis import redis_server

    with redis_server() as srv:
        gens = {"small": FakeGenerator(words=1), "large": FakeGenerator(words=3)}
        cfg = RAGConfig().replace(prompt={"max_score_gap": 0}, models=TWO, cache={"redis_url": srv.url})
        with fake_rag(tmp_path, config=cfg, generators=gens, embedder=WordsEmbedder()) as rag:
            s = asyncio.run(run_warm(rag, plan_warm([("1", "chunk number 3")]), model="large"))
            assert s.warmed == 1 and len(gens["large"].prompts) == 1 and not gens["small"].prompts
            assert rag.query("chunk number 3", model="large").cache_tier in ("l1", "l2")
            assert rag.query("chunk number 3").cache_tier == "miss"  # the default's entries are its own
