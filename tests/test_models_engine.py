"""Two models of ``[models]`` over the session's one vLLM engine (no engine is started here)."""

import pytest

from ragserve import RAG


class OnSessionLoop:
    """A generator sharing the session engine (``VllmGenerator.sharing``), called on the
    session RAG's engine loop: vLLM's AsyncLLM is bound to the loop it started on, and this
    test's second RAG has its own. (In one RAG every model runs on its one loop.)"""

    def __init__(self, view, rag):
        self.view, self.rag, self.model_name = view, rag, view.model_name

    def warm_up(self):
        pass

    def tokenizer(self):
        return self.view.tokenizer()

    async def generate(self, prompt, request_id, token_ids=None, priority=0):
        return await self.rag.acall(self.view.generate(prompt, request_id, token_ids=token_ids))

    async def stream(self, prompt, request_id, token_ids=None, deltas=True, priority=0):
        yield await self.generate(prompt, request_id, token_ids)

    def shutdown(self):
        self.view.shutdown()  # a view's: never stops the engine it shares


@pytest.mark.engine
def test_two_models_over_one_engine_answer_with_own_settings_and_cache_entries(rag, xquad_index,
                                                                              xquad_corpus):
    cfg = rag.config.replace(models={"terse": {"max_tokens": 1}, "full": {"max_tokens": 32},
                                     "default": "full"})
    engine = rag.generator
    views = {n: engine.sharing(cfg.model_config(n).generate) for n in cfg.models.names}
    assert all(v.owner is engine for v in views.values())
    gens = {n: OnSessionLoop(v, rag) for n, v in views.items()}
    questions = [q["question"] for q in xquad_corpus[1][:2]]
    with RAG.from_index(xquad_index, cfg, embedder=rag.embedder, generators=gens) as two:
        finished = engine.requests.as_dict()["finished"]
        terse = [two.query(q, model="terse") for q in questions]
        full = [two.query(q) for q in questions]  # the default
        assert engine.requests.as_dict()["finished"] == finished + 2 * len(questions)  # all on the one engine
        assert {(r.model, r.cache_tier, r.usage.completion_tokens, r.finish_reason) for r in terse} == {
            ("terse", "miss", 1, "length")}
        assert {(r.model, r.cache_tier) for r in full} == {("full", "miss")}
        assert sum(r.usage.completion_tokens for r in full) > len(full)  # its own max_tokens: 32
        again = [two.query(q, model=m) for q in questions for m in ("terse", "full")]
        assert [(r.model, r.cache_tier) for r in again] == [("terse", "l1"), ("full", "l1")] * len(questions)
        assert [r.answer for r in again[::2]] == [r.answer for r in terse]
        assert [r.answer for r in again[1::2]] == [r.answer for r in full]
    assert engine.alive()  # closing the second RAG left the session engine running
