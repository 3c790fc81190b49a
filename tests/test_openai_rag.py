"""``RAG.from_index`` with ``generate.backend = "openai"``: a real index folder (FAISS,
docstore, manifest) built with a fake embedder, answered end to end through fake
OpenAI-compatible servers on loopback (``fake_openai.py``), the prompt counted with the
servers' ``/tokenize``."""

from __future__ import annotations

import pytest

from ragserve.build.builder import build_index
from ragserve.cache.redis_server import free_port
from ragserve.config import RAGConfig
from ragserve.errors import GeneratorUnavailableError
from ragserve.generators.openai import OpenAIGenerator
from ragserve.rag import RAG
from ragserve.testing.fake_openai import Behaviour, FakeOpenAI
from ragserve.testing.fakes import FakeEmbedder
from ragserve.testing.http import running
from ragserve.types import DoneEvent, SourcesEvent, TokenEvent

pytestmark = pytest.mark.http

REPLY = "an answer from the fake server"


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    src = tmp_path_factory.mktemp("docs")
    for i in range(8):
        text = f"Paragraph {i} says that the number of the day is {i * 7}."
        (src / f"doc{i}.txt").write_text(text, "utf-8")
    out = tmp_path_factory.mktemp("indexes") / "tiny"
    build_index(src, out, RAGConfig(), embedder=FakeEmbedder())
    return out


def config(*urls, **openai):
    return RAGConfig().replace(generate={"backend": "openai", "max_tokens": 16}, prompt={"max_score_gap": 0},
                               openai={"urls": list(urls), "tokenizer": "server", "probe_interval_s": 0.1,
                                       **openai})


def test_from_index_with_the_openai_backend_answers_end_to_end(index):
    fake = FakeOpenAI(Behaviour(token_delay_s=0.01))
    dead = f"http://127.0.0.1:{free_port()}"
    with running(fake.app) as url, RAG.from_index(index, config(dead, url), embedder=FakeEmbedder()) as rag:
        assert isinstance(rag.generator, OpenAIGenerator) and rag.generator.model_name == "fake-model"
        r = rag.query("What is the number of the day?")
        assert r.answer == REPLY and r.cache_tier == "miss" and r.model == "fake-model"
        assert r.finish_reason == "stop" and r.usage.completion_tokens == 6 and len(r.sources) == 3
        # the prompt went as the servers' own token ids: the chat template, sources, question
        sent = fake.bodies[-1]["prompt"]
        assert isinstance(sent, list) and all(isinstance(t, int) for t in sent)
        assert r.usage.prompt_tokens == len(sent)
        text = fake.text(sent)
        assert text.startswith("<system>")
        assert text.endswith("Question: What is the number of the day? </user> <assistant>")
        assert r.timings.generate_first_token > 0 and r.timings.generate_queue == 0 and r.timings.prompt > 0
        assert rag.query("What is the number of the day?").cache_tier == "l1"
        events = list(rag.stream("Which paragraph says 21?"))
        assert isinstance(events[0], SourcesEvent) and isinstance(events[-1], DoneEvent)
        assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == REPLY
        stats = rag.stats()["generator"]
        assert stats["backend"] == "openai" and stats["model"] == "fake-model"
        # each miss tried the dead endpoint first (picked longest ago), then moved on
        assert [(e["requests"], e["errors"]) for e in stats["endpoints"]] == [(2, 2), (2, 0)]
        assert rag.engine_alive() and rag.engine_unfinished() == 0


def test_all_servers_gone_is_a_503_kind_of_error_and_cached_answers_still_come(index):
    fake = FakeOpenAI(Behaviour())
    with running(fake.app) as url, RAG.from_index(index, config(url, failures_to_eject=1),
                                                 embedder=FakeEmbedder()) as rag:
        assert rag.query("What is the number of the day?").answer == REPLY
        assert rag.reset_prefix_cache() is True
        fake.b.status, fake.b.healthy = 503, False
        with pytest.raises(GeneratorUnavailableError):
            rag.query("Another question entirely?")
        assert not rag.engine_alive()
        assert rag.query("What is the number of the day?").cache_tier == "l1"
