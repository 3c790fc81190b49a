"""``ray.allow_partial`` without a cluster: ``RemoteShardedIndex``'s own fan-out over fake
shard actors (each searches its real shard in process; Ray's ``get`` is replaced by one that
resolves their answers), one of whose groups has no answering copy (R = 1, its actor dead).

- off: the search is a typed 503 naming the shard (``ShardUnavailableError``);
- on: 200, the missing shard named in the body, the header and the stream's events, the
  other shard's hits merged as the single index ranks them, nothing cached in any tier (a
  second identical request is no hit), single-flight followers get the partial answer
  marked, and ``/metrics`` and ``stats()`` count the partial answers; a search that no
  shard answers is the 503 still.

The real cluster's version (an actor killed, R = 1): ``test_ray_shards.py``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from ragserve.build.sharded import build_sharded
from ragserve.client import Client
from ragserve.config import RAGConfig
from ragserve.engine.served import open_index
from ragserve.errors import ShardUnavailableError
from ragserve.rag import RAG
from ragserve.server.app import create_app
from ragserve.testing.fakes import FakeGenerator, WordsEmbedder
from ragserve.testing.http import running

WORDS = ("piano organ violin harp drum flute cello guitar trumpet oboe lute sitar banjo viola horn tuba "
         "river mountain lake forest desert ocean valley island glacier canyon").split()
QUESTION = "which piano or river or violin lake?"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Two shards of small documents whose words overlap: graded scores, hits in both shards."""
    root = tmp_path_factory.mktemp("partial")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(7)
    for i in range(24):
        (src / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, 6)) + f" number {i}.\n")
    out = root / "idx"
    build_sharded(src, out, RAGConfig(), shards=2, embedder=WordsEmbedder())
    return out


class _Ref:
    def __init__(self, call: Any) -> None:
        self.call = call


class _Method:
    def __init__(self, actor: FakeShardActor, name: str) -> None:
        self.actor, self.name = actor, name

    def remote(self, *args: Any) -> _Ref:
        return _Ref(lambda: self.actor.answer(self.name, *args))


class FakeShardActor:
    """A shard actor's ``search`` / ``ping`` over real in-process shards; ``dead``: its
    calls raise ``RayActorError`` as a killed actor's do."""

    def __init__(self, shards: list[Any]) -> None:
        self.shards, self.dead, self.searches = shards, False, 0
        self.search, self.ping = _Method(self, "search"), _Method(self, "ping")

    def answer(self, name: str, *args: Any) -> Any:
        from ray.exceptions import RayActorError

        if self.dead:
            raise RayActorError()
        if name == "ping":
            return 1
        self.searches += 1
        x, k, fill = args
        return [[[(h.chunk_id, h.score) for h in row] for row in s.search(x, k, fill=fill)]
                for s in self.shards]


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref.call())


def partial_rag(path: Path, allow: bool, actors: list[FakeShardActor], **sections: Any) -> RAG:
    from ragserve.ray.serve.fanout import RemoteShardedIndex

    cfg = RAGConfig().replace(ray={"allow_partial": allow, "shard_timeout_s": 1.0},
                              prompt={"max_score_gap": 0}, **sections)

    def opener(top: Any, shards: list[Any], load: dict[str, int]) -> Any:
        table = {"folder": str(top.folder), "search_params": {},
                 "groups": [{"shards": [f"shard-00{i}"], "actors": [a]} for i, a in enumerate(actors)]}
        return RemoteShardedIndex(top, table, supervisor=None, timeout_s=1.0,
                                  allow_partial=cfg.ray.allow_partial)

    return RAG.from_index(path, cfg, embedder=WordsEmbedder(), generator=FakeGenerator(), shards=opener)


@pytest.fixture
def actors(sharded, fake_ray) -> list[FakeShardActor]:
    """One copy of each of the two shards (R = 1); shard-001's is dead."""
    _, index, docstore = open_index(sharded, RAGConfig(), WordsEmbedder())
    found = [FakeShardActor([s]) for s in index.shards]
    found[1].dead = True
    yield found
    index.close()
    docstore.close()


def test_off_a_shard_with_no_copy_is_a_503_naming_it(sharded, actors):
    with partial_rag(sharded, False, actors) as rag:
        with pytest.raises(ShardUnavailableError) as e:
            rag.retrieve(QUESTION, 5)
        assert e.value.shards == ["shard-001"]
        with running(create_app(rag, rag.config)) as url:
            r = httpx.post(f"{url}/v1/query", json={"question": QUESTION}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["type"] == "ShardUnavailableError", r.text
            assert "shard-001" in r.json()["error"]["message"] and "retry-after" in r.headers
            assert "x-partial-shards" not in r.headers


def test_on_the_answer_is_the_other_shards_top_k_marked_partial_and_never_cached(sharded, actors):
    whole = RAG.from_index(sharded, RAGConfig(), embedder=WordsEmbedder(), generator=FakeGenerator())
    with whole:
        ranked = whole.retrieve(QUESTION, 50)  # every chunk, as the single sharded index ranks them
        first_of_001 = whole.index.offsets[1]
    expected = [s.chunk_id for s in ranked if s.chunk_id < first_of_001][:5]
    assert any(s.chunk_id >= first_of_001 for s in ranked[:5])  # the missing shard held some of the top 5
    semantic = {"enabled": True, "threshold": 0.75, "guard": "entities"}
    rag = partial_rag(sharded, True, actors, semantic=semantic)
    with rag, running(create_app(rag, rag.config)) as url:
        got = rag.retrieve(QUESTION, 5)
        assert [s.chunk_id for s in got] == expected and got.missing_shards == ("shard-001",)
        r = httpx.post(f"{url}/v1/retrieve", json={"question": QUESTION, "top_k": 5}, timeout=30)
        assert r.status_code == 200 and r.json()["missing_shards"] == ["shard-001"], r.text
        assert r.headers["x-partial-shards"] == "shard-001"
        for _ in range(2):  # the second is no hit: the partial answer was stored in no tier
            r = httpx.post(f"{url}/v1/query", json={"question": QUESTION, "top_k": 5}, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["cache_tier"] == "miss" and body["missing_shards"] == ["shard-001"]
            assert r.headers["x-partial-shards"] == "shard-001" and r.headers["x-cache"] == "miss"
            assert [s["chunk_id"] for s in body["sources"]] == expected[:len(body["sources"])]
        cache = rag.stats()["cache"]
        assert cache["l1"]["entries"] == 0
        assert cache["semantic"]["writes"] == cache["semantic"]["entries"] == 0
        events = _sse(httpx.post(f"{url}/v1/query", json={"question": QUESTION, "stream": True}, timeout=30))
        assert events[0][0] == "sources" and events[0][1]["missing_shards"] == ["shard-001"]
        assert events[-1][0] == "done" and events[-1][1]["missing_shards"] == ["shard-001"]
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                          json={"model": "ragserve", "messages": [{"role": "user", "content": QUESTION}]})
        assert chat.status_code == 200, chat.text
        assert chat.json()["ragserve"]["missing_shards"] == ["shard-001"]
        assert chat.headers["x-partial-shards"] == "shard-001"
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert "ragserve_partial_answers_total 4.0" in metrics
        stats = rag.stats()
        assert stats["partial"] == 4 and stats["partial_retrievals"] == 2
        with Client(url) as client:  # ragserve's own client reads the mark
            assert client.retrieve(QUESTION, 5).missing_shards == ("shard-001",)
            assert client.query(QUESTION).missing_shards == ["shard-001"]
            events = list(client.stream(QUESTION))
            assert events[0].missing_shards == ("shard-001",) and events[-1].result.partial


def test_on_a_search_that_no_shard_answers_is_still_a_503(sharded, actors):
    actors[0].dead = True
    with partial_rag(sharded, True, actors) as rag:
        with pytest.raises(ShardUnavailableError) as e:
            rag.query(QUESTION)
        assert e.value.shards == ["shard-000", "shard-001"]


def test_single_flight_followers_of_a_partial_run_get_it_marked(sharded, actors):
    with partial_rag(sharded, True, actors) as rag:
        rag.generator.delay = 0.05  # the run lasts long enough for the others to join it

        async def three() -> list[Any]:
            return await asyncio.gather(*(rag.aquery(QUESTION) for _ in range(3)))

        results = asyncio.run(three())
        assert sum(r.shared for r in results) == 2
        assert all(r.missing_shards == ["shard-001"] and r.partial for r in results)
        assert rag.query(QUESTION).cache_tier == "miss"  # and none of them was cached
        assert len(rag.cache.l1) == 0


def _sse(r: httpx.Response) -> list[tuple[str, Any]]:
    out = []
    for block in r.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            out.append((lines["event"], orjson.loads(lines["data"]) if lines.get("data") else None))
    return out


def test_ray_metrics_count_partial_answers(monkeypatch):
    from ray.serve import metrics

    class Metric:
        def __init__(self, name, *args, **kwargs):
            self.name, self.count = name, 0

        def inc(self, value=1, tags=None):
            self.count += value

        def observe(self, value, tags=None):
            pass

    monkeypatch.setattr(metrics, "Counter", Metric)
    monkeypatch.setattr(metrics, "Histogram", Metric)
    from ragserve.ray.serve.metrics import RayMetrics
    from ragserve.types import QueryResult, Timings, TokenUsage

    m = RayMetrics()
    for missing in ([], ["shard-001"]):
        result = QueryResult("q", "a", [], Timings(), "miss", "m", "f", TokenUsage(), missing_shards=missing)
        m.on_result(result, {})
    assert m.partial.name == "ragserve_partial_answers" and m.partial.count == 1 and m.answers.count == 2
