"""The prompt layout against the real engine: index order lets vLLM's prefix cache serve
the shared sources again; score order does not when the scores differ."""

import pytest

from ragserve.config.prompt import PromptConfig
from ragserve.generators.prompt import PromptBuilder
from ragserve.types import Source

pytestmark = pytest.mark.engine


def _hits_of_second(rag, order: str, first: list[Source], second: list[Source]) -> tuple[int, int]:
    """Prefix-cache hit tokens and looked-up tokens of the second of two prompts over the
    same chunks, sent one after the other on a freshly reset cache."""
    g = rag.config.generate
    builder = PromptBuilder(rag.generator.tokenizer(), g.max_model_len, g.max_tokens,
                            PromptConfig(max_score_gap=0, order=order))
    assert rag.reset_prefix_cache()
    counter = rag.generator.prefix_cache
    for n, (question, sources) in enumerate((("Who wrote the first text?", first),
                                             ("In which year did the second event happen?", second))):
        if n == 1:
            hits, queries = counter.hits, counter.queries
        p = builder.build(question, sources)
        rag.call(rag.generator.generate(p.text, f"layout-{order}-{n}", token_ids=p.token_ids))
    return counter.hits - hits, counter.queries - queries


def test_index_order_raises_prefix_cache_hits(rag):
    chunks = rag.docstore.get_many(range(3))
    texts = [c.text for c in chunks]
    # The same three chunks, retrieved for two questions with different scores.
    first = [Source(c.doc_id, c.chunk_id, s, t) for c, s, t in zip(chunks, (0.9, 0.8, 0.7), texts)]
    second = [Source(c.doc_id, c.chunk_id, s, t) for c, s, t in zip(chunks, (0.7, 0.8, 0.9), texts)]
    canonical_hits, canonical_queries = _hits_of_second(rag, "chunk_id", first, second)
    score_hits, _ = _hits_of_second(rag, "score", first, second)
    assert canonical_queries > 0
    # In index order everything up to the question is shared: most of the prompt.
    assert canonical_hits >= 0.5 * canonical_queries, (canonical_hits, canonical_queries)
    assert canonical_hits > score_hits, (canonical_hits, score_hits)
    assert rag.stats()["generator"]["prefix_cache"]["hit_rate"] is not None
