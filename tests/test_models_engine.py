"""Two models of ``[models]`` over the session's one vLLM engine (no engine is started here)."""

import pytest

from ragserve import RAG


@pytest.mark.engine
def test_two_models_over_one_engine_answer_with_own_settings_and_cache_entries(rag, xquad_index,
                                                                              xquad_corpus):
    cfg = rag.config.replace(models={"terse": {"max_tokens": 1}, "full": {"max_tokens": 32},
                                     "default": "full"})
    engine = rag.generator
    # As make_generators builds them from the config, but over the session's engine: a
    # view's close never stops the engine it shares.
    gens = {n: engine.sharing(cfg.model_config(n).generate) for n in cfg.models.names}
    assert all(g.owner is engine for g in gens.values())
    questions = [q["question"] for q in xquad_corpus[1][:4]]
    with RAG.from_index(xquad_index, cfg, embedder=rag.embedder, generators=gens) as two:
        finished = engine.requests.as_dict()["finished"]
        terse = [two.query(q, model="terse") for q in questions]
        full = [two.query(q) for q in questions]  # the default
        assert engine.requests.as_dict()["finished"] == finished + 8  # all on the one engine
        assert {(r.model, r.cache_tier, r.usage.completion_tokens, r.finish_reason) for r in terse} == {
            ("terse", "miss", 1, "length")}
        assert {(r.model, r.cache_tier) for r in full} == {("full", "miss")}
        assert sum(r.usage.completion_tokens for r in full) > len(full)  # its own max_tokens: 32
        again = [two.query(q, model=m) for q in questions for m in ("terse", "full")]
        assert [(r.model, r.cache_tier) for r in again] == [("terse", "l1"), ("full", "l1")] * len(questions)
        assert [r.answer for r in again[::2]] == [r.answer for r in terse]
        assert [r.answer for r in again[1::2]] == [r.answer for r in full]
    assert engine.alive() and rag.query(questions[0], cache_read=False).answer  # the session engine serves on
