"""``ragserve.client`` against ``ragserve serve``'s app over the real engine (the session's
one vLLM engine), served by a real uvicorn on loopback."""

import pytest

from ragserve import Client, DoneEvent, QueryResult, Source, SourcesEvent, TokenEvent
from ragserve.server.app import create_app
from ragserve.testing.http import post, running
from ragserve.testing.waits import HTTP_TIMEOUT_S

pytestmark = [pytest.mark.engine, pytest.mark.http]


@pytest.fixture(scope="module")
def url(rag):
    with running(create_app(rag, rag.config)) as base:
        yield base


def test_client_query_is_what_the_server_answered_and_its_stream_is_typed(url, xquad_corpus):
    q = xquad_corpus[1][52]
    with Client(url, timeout_s=HTTP_TIMEOUT_S) as client:
        r = client.query(q["question"], request_id="client-engine-1")
        # The same question again, without the client: the server answers it from L1.
        raw = post(f"{url}/v1/query", json={"question": q["question"]}).json()
        assert isinstance(r, QueryResult) and r.request_id == "client-engine-1"
        assert raw["cache_tier"] == "l1" and r.answer.strip() and r.answer == raw["answer"]
        assert r.to_dict()["sources"] == raw["sources"] and all(isinstance(s, Source) for s in r.sources)
        assert r.sources
        assert r.model == raw["model"] == "SmolLM2-135M-Instruct" and r.usage.completion_tokens > 0

        events = list(client.stream(xquad_corpus[1][53]["question"], cache_read=False, cache_write=False))
    assert isinstance(events[0], SourcesEvent) and isinstance(events[-1], DoneEvent)
    tokens = events[1:-1]
    assert len(tokens) > 1 and all(isinstance(e, TokenEvent) for e in tokens)  # pieces, as generated
    assert "".join(e.text for e in tokens) == events[-1].result.answer
    assert events[-1].result.sources == events[0].sources
