"""Hot reload on real components (MiniLM, FAISS, versioned index folders), with a fake
generator: the engine is not what is under test, the swap of the served index is."""

import asyncio
import shutil
import threading

import pytest

from ragserve.build.builder import build_index
from ragserve.config import RAGConfig
from ragserve.errors import IndexIntegrityError
from ragserve.index.verify import verify
from ragserve.rag import RAG
from ragserve.retrieval.docstore import LazyDocStore
from ragserve.server.app import create_app
from ragserve.testing.fakes import FakeGenerator
from ragserve.testing.http import post, running
from ragserve.testing.waits import aeventually, eventually

pytestmark = pytest.mark.integration
MARK = " The archive was moved to the zebra building in 2031."


@pytest.fixture
def versions(tmp_path, xquad_corpus, replay_embedder):
    """(source folder, index path, the first build's report): a versioned index to rebuild."""
    src = tmp_path / "src"
    shutil.copytree(xquad_corpus[0], src)
    out = tmp_path / "idx"
    v1 = build_index(src, out, embedder=replay_embedder)
    return src, out, v1


def chunk_texts(folder):
    store = LazyDocStore(folder)
    try:
        return {c.text for c in store.get_many(range(len(store)))}
    finally:
        store.close()


def test_reload_under_load_fails_nothing_and_serves_no_stale_answer(versions, xquad_corpus, replay_embedder):
    src, out, v1 = versions
    questions = [q["question"] for q in xquad_corpus[1][:64]]
    gen = FakeGenerator(delay=0.3)
    with RAG.from_index(out, RAGConfig(), embedder=replay_embedder, generator=gen) as rag:
        before = rag.query(questions[0])
        assert before.index_fingerprint == v1.fingerprint
        first = rag.served.current
        old_folder = rag.manifest.folder
        for f in sorted(src.glob("*.txt"))[:4]:  # four documents change: their chunks differ between versions
            f.write_text(f.read_text("utf-8") + MARK, encoding="utf-8")
        v2 = build_index(src, out, embedder=replay_embedder)
        texts = {v1.fingerprint: chunk_texts(old_folder), v2.fingerprint: chunk_texts(verify(out).folder)}
        assert texts[v1.fingerprint] != texts[v2.fingerprint]

        async def load():
            tasks = [asyncio.ensure_future(rag.aquery(q, cache_read=False)) for q in questions]
            # all 64 have searched v1 and are generating (0.3 s each; two of them ask the same,
            # and share a run) when the reload comes
            await aeventually(lambda: len(gen.prompts) >= 1 + len(set(questions)),
                              what="the 64 to reach the generator")
            result = await asyncio.to_thread(rag.reload)
            late = [asyncio.ensure_future(rag.aquery(q, cache_read=False)) for q in questions[32:48]]
            return result, await asyncio.gather(*tasks, *late, return_exceptions=True)

        result, results = asyncio.run(load())
        assert result["changed"] and result["fingerprint"] == v2.fingerprint == rag.fingerprint
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, failed[:3]
        seen = {r.index_fingerprint for r in results}
        assert seen == {v1.fingerprint, v2.fingerprint}  # in flight on v1, after the swap on v2
        for r in results:  # every source comes from the docstore of the version the request searched
            assert all(s.text in texts[r.index_fingerprint] for s in r.sources), r.question
        assert all(r.index_fingerprint == v2.fingerprint for r in results[64:])
        # The answer cached on v1 is never served again: its key carries v1's fingerprint.
        after = rag.query(questions[0])
        assert after.cache_tier == "miss" and after.index_fingerprint == v2.fingerprint
        assert rag.query(questions[0]).cache_tier == "l1"
        assert first.retired and first.users == 0 and first.closed  # released with its last request
        assert rag.stats()["gauges"]["in_flight"]["current"] == 0


def test_the_old_version_is_released_when_its_last_request_ends(versions, replay_embedder):
    src, out, v1 = versions
    gen = FakeGenerator(delay=1.0)
    with RAG.from_index(out, RAGConfig(), embedder=replay_embedder, generator=gen) as rag:
        first = rag.served.current
        for f in sorted(src.glob("*.txt"))[:1]:
            f.write_text(f.read_text("utf-8") + MARK, encoding="utf-8")
        build_index(src, out, embedder=replay_embedder)
        gen.hold = True  # the request holds the old version until the reload is checked, however long
        holder = threading.Thread(target=rag.query, args=("Who held the old version?",))
        holder.start()
        try:
            eventually(lambda: gen.running, what="the request to be generating on the old version")
            rag.reload()
            # still held (the request, its run)
            assert first.retired and first.users >= 1 and not first.closed
        finally:
            gen.hold = False
            holder.join()
        assert first.users == 0 and first.closed and rag.served.current is not first


def test_a_corrupt_or_missing_new_index_is_refused_and_the_old_keeps_serving(versions, tmp_path,
                                                                            replay_embedder):
    src, out, v1 = versions
    with RAG.from_index(out, RAGConfig(), embedder=replay_embedder, generator=FakeGenerator()) as rag:
        bad = tmp_path / "bad"
        shutil.copytree(verify(out).folder, bad)
        data = bytearray((bad / "index.faiss").read_bytes())
        data[-100] ^= 0xFF
        (bad / "index.faiss").write_bytes(bytes(data))
        with pytest.raises(IndexIntegrityError):
            rag.reload(bad)
        (bad / "chunks.jsonl").write_text("half-written", encoding="utf-8")
        with pytest.raises(IndexIntegrityError):
            rag.reload(bad)
        assert rag.fingerprint == v1.fingerprint and rag.query("still serving?").answer
        assert rag.reload() == {**rag.reload(), "changed": False}  # the same version again: nothing to do


def test_admin_reload_over_http_needs_the_admin_key(versions, replay_embedder):
    src, out, v1 = versions
    cfg = RAGConfig().replace(server={"admin_key": "admin-secret-0123456789"})
    with RAG.from_index(out, cfg, embedder=replay_embedder, generator=FakeGenerator()) as rag:
        with running(create_app(rag, cfg)) as url:
            assert post(f"{url}/admin/reload").status_code == 401
            assert post(f"{url}/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
            for f in sorted(src.glob("*.txt"))[:1]:
                f.write_text(f.read_text("utf-8") + MARK, encoding="utf-8")
            v2 = build_index(src, out, embedder=replay_embedder)
            r = post(f"{url}/admin/reload", headers={"Authorization": "Bearer admin-secret-0123456789"},
                           timeout=60)
            assert r.status_code == 200 and r.json()["changed"] and r.json()["fingerprint"] == v2.fingerprint
            q = post(f"{url}/v1/query", json={"question": "which version?"}).json()
            assert q["index_fingerprint"] == v2.fingerprint
    with RAG.from_index(out, RAGConfig(), embedder=replay_embedder, generator=FakeGenerator()) as rag:
        with running(create_app(rag, RAGConfig())) as url:
            assert post(f"{url}/admin/reload").status_code == 404  # no admin key: no admin endpoints


def test_a_stream_never_iterated_holds_no_index_version(versions, replay_embedder):
    src, out, v1 = versions
    with RAG.from_index(out, RAGConfig(), embedder=replay_embedder, generator=FakeGenerator()) as rag:
        first = rag.served.current
        abandoned = rag.stream("never read")  # prepared, never started
        for f in sorted(src.glob("*.txt"))[:1]:
            f.write_text(f.read_text("utf-8") + MARK, encoding="utf-8")
        build_index(src, out, embedder=replay_embedder)
        rag.reload()
        assert first.closed  # nothing held it: released at the swap
        events = list(abandoned)  # started late: it runs on the version current now
        assert events[-1].result.index_fingerprint == rag.fingerprint != v1.fingerprint


def test_a_shared_run_keeps_its_version_open_after_its_leader_leaves(versions, replay_embedder):
    """A → B → A: the same fingerprint again, so the same key; the follower of a run whose
    leader was cancelled must still read the docstore it searched."""
    src, out, v1 = versions
    gen = FakeGenerator(delay=0.6)
    with RAG.from_index(out, RAGConfig(), embedder=replay_embedder, generator=gen) as rag:
        a_folder = verify(out).folder
        for f in sorted(src.glob("*.txt"))[:1]:
            f.write_text(f.read_text("utf-8") + MARK, encoding="utf-8")
        build_index(src, out, embedder=replay_embedder)

        async def scenario():
            gen.hold = True  # the leader's run is generating until the follower has it alone
            leader = asyncio.ensure_future(rag.aquery("Which year?"))
            await aeventually(lambda: gen.running == 1, what="the leader's run to start")
            follower = asyncio.ensure_future(rag.aquery("Which year?"))
            await aeventually(lambda: rag.stats()["single_flight"]["shared"] == 1,
                              what="the follower to join it")
            await asyncio.to_thread(rag.reload)            # to B
            await asyncio.to_thread(rag.reload, a_folder)  # back to A: a new snapshot, same fingerprint
            leader.cancel()
            await asyncio.gather(leader, return_exceptions=True)  # the leader has left
            gen.hold = False
            return await follower

        result = asyncio.run(scenario())
        assert result.answer and result.sources and result.index_fingerprint == v1.fingerprint
        assert len(gen.prompts) == 1  # the follower was answered by the leader's run
