"""The semantic answer tier on fakes: hits, partitions, the guard, the config, metrics."""

import asyncio

import numpy as np
import pytest

from ragserve.cache.guard import features, guard_reason
from ragserve.cache.semantic import Partition, SemanticCache
from ragserve.config import RAGConfig, SemanticConfig
from ragserve.errors import ConfigError
from ragserve.testing.fakes import FakeGenerator, WordsEmbedder, fake_rag
from ragserve.types import QueryResult

ON = {"enabled": True, "threshold": 0.75, "guard": "entities"}


def semantic_rag(tmp_path, **semantic):
    return fake_rag(tmp_path, FakeGenerator(), embedder=WordsEmbedder(),
                    semantic={**ON, **semantic}, prompt={"max_score_gap": 0})


def test_a_paraphrase_is_served_with_its_match_and_similarity(tmp_path):
    with semantic_rag(tmp_path) as rag:
        first = rag.query("who founded the company?")
        r = rag.query("please tell me who founded the company?")
        assert first.cache_tier == "miss" and r.cache_tier == "semantic"
        assert r.answer == first.answer and r.sources == first.sources
        assert r.question == "please tell me who founded the company?"
        assert r.semantic_match == "who founded the company?" and 0.75 <= r.semantic_similarity < 1.0
        assert r.timings.cache_semantic > 0 and r.timings.generate == 0
        assert len(rag.generator.prompts) == 1
        # One embedding per question: the miss's retrieval reused the lookup's vector.
        assert rag.embedder.texts == ["who founded the company?", "please tell me who founded the company?"]
        s = rag.stats()["cache"]["semantic"]
        assert s["lookups"] == 2 and s["hits"] == 1 and s["empty"] == 1 and s["entries"] == 1
        assert sum(s["similarity_buckets"].values()) == 1
        assert rag.stats()["tiers"]["semantic"]["queries"] == 1
        # A semantic hit is no new entry: the next paraphrase matches the generated question.
        assert rag.query("who founded that company?").semantic_match == "who founded the company?"


def test_below_the_threshold_is_a_miss(tmp_path):
    with semantic_rag(tmp_path, threshold=0.99) as rag:
        rag.query("who founded the company?")
        r = rag.query("please tell me who founded the company?")
        assert r.cache_tier == "miss" and r.semantic_match is None
        assert rag.stats()["cache"]["semantic"]["below_threshold"] == 1


def test_off_by_default_and_no_second_embedding_path(tmp_path):
    assert RAGConfig().semantic.enabled is False
    with fake_rag(tmp_path, embedder=WordsEmbedder()) as rag:
        rag.query("who founded the company?")
        assert rag.query("please tell me who founded the company?").cache_tier == "miss"
        assert rag.stats()["cache"]["semantic"] is None
        assert rag.stats()["embed_batches"]["embed_only_batches"] == 0


def test_namespaces_never_share_and_no_read_no_write_are_kept(tmp_path):
    with semantic_rag(tmp_path) as rag:
        rag.query("who founded the company?", namespace="a")
        assert rag.query("please tell me who founded the company?", namespace="b").cache_tier == "miss"
        assert rag.query("please tell me who founded the company?", namespace="a").cache_tier == "semantic"
        assert rag.query("who founded the company now?", namespace="a", cache_read=False).cache_tier == "miss"
        rag.query("which river runs through the city?", cache_write=False)
        assert rag.query("which river runs through that city?").cache_tier == "miss"


def test_top_k_and_index_fingerprint_are_hard_partitions(tmp_path):
    with semantic_rag(tmp_path) as rag:
        rag.query("who founded the company?")
        assert rag.query("please tell me who founded the company?", top_k=2).cache_tier == "miss"
        cache = rag.cache
        same = cache.partition(None, "f" * 64)
        assert cache.partition(None, "e" * 64) != same and cache.partition("x", "f" * 64) != same
        v = WordsEmbedder().encode(["please tell me who founded the company?"])[0]

        async def look(partition):
            return await cache.semantic.lookup(partition, v, "please tell me who founded the company?")

        assert rag.call(look(same)) is not None
        assert rag.call(look(cache.partition(None, "e" * 64))) is None  # another index version


def test_sync_async_and_stream_make_the_same_decision(tmp_path):
    with semantic_rag(tmp_path) as rag:
        rag.query("who founded the company?")
        q = "please tell me who founded the company?"
        sync = rag.query(q)
        asyn = asyncio.run(rag.aquery(q))
        events = list(rag.stream(q))
        assert sync.cache_tier == asyn.cache_tier == events[0].cache_tier == events[-1].result.cache_tier == "semantic"
        assert sync.semantic_similarity == asyn.semantic_similarity == events[-1].result.semantic_similarity


def test_the_guard_refuses_high_similarity_changes(tmp_path):
    with semantic_rag(tmp_path, threshold=0.5) as rag:
        rag.query("what did Tesla invent in 1890?")
        for q in ("what did Tesla not invent in 1890?", "what did Tesla invent in 1891?",
                  "what did Edison invent in 1890?"):
            assert rag.query(q, cache_write=False).cache_tier == "miss", q
        assert rag.stats()["cache"]["semantic"]["guarded"] == {"negation": 1, "number": 1, "entity": 1}


@pytest.mark.parametrize(("a", "b", "mode", "reason"), [
    ("Who founded the company?", "Can you tell me who founded the company?", "strict", None),
    ("Who founded the company?", "who was the founder of the company", "strict", None),
    ("When did the war end?", "When didn't the war end?", "entities", "negation"),
    ("How many people lived there in 1900?", "How many people lived there in 1910?", "entities", "number"),
    ("What is the third largest city?", "What is the second largest city?", "entities", "number"),
    ("Where did Newton study?", "Where did Leibniz study?", "entities", "entity"),
    ("What colour is the sky?", "What colour is the sea?", "entities", None),
    ("What colour is the sky?", "What colour is the sea?", "strict", "content"),
    ("What colour is the sky?", "What colour is the sea?", "off", None),
])
def test_guard_rules(a, b, mode, reason):
    assert guard_reason(a, b, mode) == reason


def test_guard_features_ignore_the_first_words_capital():
    assert features("Where is Basel?")[2] == {"basel"}
    assert features("Where is basel?")[2] == frozenset()


def test_config_refuses_an_uncalibrated_or_bad_tier():
    with pytest.raises(ConfigError, match="semantic.threshold.*calibrate-semantic"):
        RAGConfig().replace(semantic={"enabled": True})
    with pytest.raises(ConfigError, match="semantic.guard"):
        RAGConfig().replace(semantic={"guard": "loose"})
    with pytest.raises(ConfigError, match="semantic.threshold"):
        RAGConfig().replace(semantic={"threshold": 1.5})
    cfg = RAGConfig.load(env={"RAGSERVE_SEMANTIC_ENABLED": "true", "RAGSERVE_SEMANTIC_THRESHOLD": "0.9"})
    assert cfg.semantic.enabled and cfg.semantic.threshold == 0.9
    assert RAGConfig().fingerprint() == cfg.fingerprint()  # the tier never changes exact keys


def test_a_threshold_calibrated_for_another_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="calibrated_model"):
        fake_rag(tmp_path, embedder=WordsEmbedder(), semantic={**ON, "calibrated_model": "all-MiniLM-L6-v2"})
    with fake_rag(tmp_path / "ok", embedder=WordsEmbedder(), semantic={**ON, "calibrated_model": "words"}) as rag:
        assert rag.cache.semantic is not None


def test_an_answer_gone_from_every_tier_is_a_miss_and_its_vector_dropped(tmp_path):
    with semantic_rag(tmp_path) as rag:
        rag.query("who founded the company?")
        rag.cache.l1.clear()
        assert rag.query("please tell me who founded the company?").cache_tier == "miss"
        s = rag.stats()["cache"]["semantic"]
        assert s["no_answer"] == 1 and s["hits"] == 0


def test_partition_bounds_and_dimensions():
    p = Partition(max_entries=10)
    rng = np.random.default_rng(0)
    for i in range(25):
        v = rng.normal(size=4).astype(np.float32)
        assert p.add(f"k{i}", f"q{i}", v / np.linalg.norm(v))
    assert p.n <= 10 and set(p.rows) == {p.keys[r] for r in p.rows.values()}
    assert "k24" in p.rows and "k0" not in p.rows
    assert not p.add("other", "q", np.ones(8, np.float32))  # another model's dimension
    assert p.nearest(np.ones(8, np.float32)) is None


def test_partitions_are_bounded():
    cache = SemanticCache(SemanticConfig(enabled=True, threshold=0.5, max_partitions=2))
    for pid in ("a", "b", "c"):
        cache.remember(pid, "k", "q", np.ones(4, np.float32) / 2)
    assert list(cache.partitions) == ["b", "c"]


def test_results_round_trip_through_json():
    from ragserve.types import Timings, TokenUsage

    r = QueryResult("q", "a", [], Timings(cache_semantic=0.2), "semantic", "m", "f", TokenUsage(),
                    semantic_match="q0", semantic_similarity=0.93)
    back = QueryResult.from_dict(r.to_dict())
    assert back == r
    old = r.to_dict()
    del old["semantic_match"], old["semantic_similarity"]
    assert QueryResult.from_dict(old).semantic_match is None  # an older server's body


def test_prometheus_reports_the_tier(tmp_path):
    from ragserve.server.prometheus import PrometheusExporter

    with semantic_rag(tmp_path) as rag:
        exporter = PrometheusExporter(rag)
        rag.observers.add(exporter)
        rag.query("who founded the company?")
        rag.query("please tell me who founded the company?")
        text = exporter.render().decode()
        assert 'ragserve_answers_total{cache_tier="semantic"} 1.0' in text
        assert "ragserve_semantic_lookups_total 2.0" in text and "ragserve_semantic_hits_total 1.0" in text
        assert "ragserve_semantic_similarity_count 1.0" in text


@pytest.mark.http
def test_over_http_tenants_never_share_and_the_client_reads_the_match(tmp_path):
    from ragserve.client import Client
    from ragserve.server.app import create_app
    from ragserve.server.auth import ApiKeys
    from ragserve.testing.http import post, running

    key_a, key_b = "tenant-a-key-0123456789", "tenant-b-key-0123456789"
    rag = semantic_rag(tmp_path)
    with rag, running(create_app(rag, rag.config, keys=ApiKeys({key_a: "a", key_b: "b"}))) as url:
        a, b = ({"Authorization": f"Bearer {k}"} for k in (key_a, key_b))
        assert post(f"{url}/v1/query", json={"question": "who founded the company?"}, headers=a).headers["x-cache"] == "miss"
        paraphrase = {"question": "please tell me who founded the company?"}
        r = post(f"{url}/v1/query", json={**paraphrase, "namespace": "a"}, headers=b)
        assert r.headers["x-cache"] == "miss"  # B's key decides: B's partition has nothing of A's
        r = post(f"{url}/v1/query", json=paraphrase, headers=a)
        body = r.json()
        assert r.headers["x-cache"] == "semantic" and body["semantic_match"] == "who founded the company?"
        with Client(url, api_key=key_a) as client:
            result = client.query("who founded that company?")
        assert result.cache_tier == "semantic" and result.semantic_match == "who founded the company?"
        assert 0.75 <= result.semantic_similarity < 1


def test_a_reload_never_serves_the_old_versions_entries(tmp_path):
    from ragserve.build.builder import build_index
    from ragserve.rag import RAG

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"doc{i}.txt").write_text(f"The company number {i} was founded by person {i}.")
    embedder = WordsEmbedder(dim=32)
    build_index(src, tmp_path / "idx", embedder=embedder)
    cfg = RAGConfig().replace(semantic=ON, prompt={"max_score_gap": 0})
    with RAG.from_index(tmp_path / "idx", cfg, embedder=embedder, generator=FakeGenerator()) as rag:
        rag.query("who founded the company?")
        assert rag.query("who founded the company then?", cache_write=False).cache_tier == "semantic"
        (src / "doc0.txt").write_text("The company was founded by someone else entirely.")
        build_index(src, tmp_path / "idx", embedder=embedder)
        assert rag.reload()["changed"]
        assert rag.query("who founded the company then?").cache_tier == "miss"
