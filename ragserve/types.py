"""Values that cross stages, and the stage interfaces as Protocols.

The pipeline depends only on these Protocols, so any embedder, index, docstore or
generator that has the same methods plugs in (tests use small fakes for logic).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol

import numpy as np

CacheTier = Literal["l1", "l2", "semantic", "miss"]


@dataclass(frozen=True)
class Chunk:
    """One piece of a document, as stored in the docstore."""

    chunk_id: int
    doc_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    """A retrieved chunk with its similarity score (cosine, higher is closer)."""

    doc_id: str
    chunk_id: int
    score: float
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Source:
        """A source from its JSON form (the server's ``sources`` items); keys it does not
        know are ignored, so an older client reads a newer server's answers."""
        return cls(str(d["doc_id"]), int(d["chunk_id"]), float(d["score"]), str(d["text"]),
                   dict(d.get("metadata") or {}))


class Sources(list[Source]):
    """A retrieval's sources, best first (a ``list``), and ``missing_shards``: the shards of
    a sharded index that did not answer the search (``ray.allow_partial``), so these are
    the other shards' top-k; empty when every shard answered (the result is whole)."""

    __slots__ = ("missing_shards",)

    def __init__(self, sources: Sequence[Source] = (), missing_shards: Sequence[str] = ()) -> None:
        super().__init__(sources)
        self.missing_shards = tuple(missing_shards)


@dataclass(frozen=True)
class Hit:
    """A search result before the docstore is read: chunk id and score only."""

    chunk_id: int
    score: float


@dataclass
class Timings:
    """Milliseconds spent in each stage of one query.

    ``cache_l1`` / ``cache_l2`` are the lookups in each cache tier (0 when skipped);
    ``cache_semantic`` the semantic tier's lookup and the fetch of its answer (the query's
    embedding before it is under ``embed``).
    ``admission`` is the wait for a slot under ``query.max_in_flight``; ``embed_wait`` the
    wait for a micro-batch to start, and ``embed`` / ``search`` the time of the batch the
    query rode in (shared with the other queries of that batch).

    ``generate`` is measured here; its split into ``generate_queue`` (waiting in vLLM's
    scheduler), ``generate_first_token`` (prefill: scheduled → first token) and
    ``generate_decode`` (first → last token) comes from vLLM's own per-request metrics.
    With the ``openai`` backend it is measured by the client unless the server reports its
    own: ``generate_queue`` 0, ``generate_first_token`` the time to the first streamed
    token (queue + prefill + the network), ``generate_decode`` first → last token.
    """

    cache_l1: float = 0.0
    cache_l2: float = 0.0
    cache_semantic: float = 0.0
    admission: float = 0.0
    embed_wait: float = 0.0
    embed: float = 0.0
    search: float = 0.0
    docload: float = 0.0
    prompt: float = 0.0
    generate: float = 0.0
    # Parts of ``generate`` (``part_of``): reports show them under it, never add them again.
    generate_queue: float = field(default=0.0, metadata={"part_of": "generate"})
    generate_first_token: float = field(default=0.0, metadata={"part_of": "generate"})
    generate_decode: float = field(default=0.0, metadata={"part_of": "generate"})
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        # NOTE: not dataclasses.asdict, which deep-copies each float through a recursion
        # (once per answer, on every path that returns timings).
        return {name: round(getattr(self, name), 3) for name in _TIMING_NAMES}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Timings:
        """The inverse of ``as_dict`` (stages it does not know are ignored)."""
        return cls(**{f.name: float(d[f.name]) for f in fields(cls) if f.name in d})

    def __str__(self) -> str:
        return "  ".join(f"{k}={v:.1f}ms" for k, v in self.as_dict().items())


_TIMING_NAMES = tuple(f.name for f in fields(Timings))


@dataclass(frozen=True, slots=True)
class SpanRef:
    """One span of a recorded trace, by its W3C ids (lowercase hex): the span that generated
    an answer (``QueryResult.origin_span``), which the answer cache keeps with the answer so
    that a hit's trace can link to it (docs/observability.md)."""

    trace_id: str
    span_id: str


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Generation:
    """What the generation stage returns for one prompt."""

    text: str
    usage: TokenUsage
    finish_reason: str | None
    queue_ms: float = 0.0
    first_token_ms: float = 0.0
    decode_ms: float = 0.0


@dataclass
class QueryResult:
    """The answer to one question, with everything needed to trust and debug it.

    ``str(result)`` is the answer text.
    """

    question: str
    answer: str
    sources: list[Source]
    timings: Timings
    cache_tier: CacheTier
    model: str
    index_fingerprint: str
    usage: TokenUsage
    finish_reason: str | None = None
    dropped_sources: int = 0
    """Retrieved chunks left out of the prompt because they did not fit the token budget."""
    request_id: str = ""
    """This request's id (the caller's, or a new one); a miss's vLLM request carries it."""
    shared: bool = False
    """A miss answered by a run that an identical concurrent request started (single-flight):
    its tokens were generated once, for that request."""
    semantic_match: str | None = None
    """A ``semantic`` hit: the cached question whose answer was served (else None)."""
    semantic_similarity: float | None = None
    """A ``semantic`` hit: the cosine similarity of the question to ``semantic_match``."""
    missing_shards: list[str] = field(default_factory=list)
    """The shards of a sharded index that did not answer the search (``ray.allow_partial``):
    the answer is grounded in the other shards' top-k only. Empty: a whole answer. A
    partial answer is never cached."""
    origin_span: SpanRef | None = field(default=None, repr=False, compare=False)
    """With tracing on where the answer was generated (and that trace sampled): the span that
    generated it, the run's ``chat`` span; for a hit, the span of the request whose answer
    the cache served (kept with the cached answer, in L1 and L2). None when the answer was
    generated untraced. What a hit's spans link to; not part of ``to_dict``."""

    def __str__(self) -> str:
        return self.answer

    @property
    def partial(self) -> bool:
        """Some shard did not answer: ``missing_shards`` names them."""
        return bool(self.missing_shards)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["origin_span"]
        d["timings"] = self.timings.as_dict()
        d["usage"]["total_tokens"] = self.usage.total_tokens
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QueryResult:
        """The inverse of ``to_dict`` (the body of ``POST /v1/query``, the ``done`` event of
        its stream): what ``ragserve.client`` returns. Keys it does not know are ignored."""
        usage = d.get("usage") or {}
        return cls(
            question=d["question"], answer=d["answer"],
            sources=[Source.from_dict(s) for s in d.get("sources") or []],
            timings=Timings.from_dict(d.get("timings") or {}), cache_tier=d["cache_tier"],
            model=d.get("model", ""), index_fingerprint=d.get("index_fingerprint", ""),
            usage=TokenUsage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
            finish_reason=d.get("finish_reason"), dropped_sources=int(d.get("dropped_sources", 0)),
            request_id=d.get("request_id", ""), shared=bool(d.get("shared", False)),
            semantic_match=d.get("semantic_match"),
            semantic_similarity=None if d.get("semantic_similarity") is None else float(d["semantic_similarity"]),
            missing_shards=[str(n) for n in d.get("missing_shards") or []],
        )


@dataclass(frozen=True)
class SourcesEvent:
    """First event of a stream: what the answer will be grounded in."""

    sources: list[Source]
    cache_tier: CacheTier
    missing_shards: tuple[str, ...] = ()
    """As ``QueryResult.missing_shards``: the answer to come is partial."""


@dataclass(frozen=True)
class TokenEvent:
    """A piece of the answer text, as the model generates it (one piece for a cache hit)."""

    text: str


@dataclass(frozen=True)
class DoneEvent:
    """Last event of a stream: the whole result, with the final timings."""

    result: QueryResult


StreamEvent = SourcesEvent | TokenEvent | DoneEvent


class Embedder(Protocol):
    dim: int
    identity: dict[str, Any]

    def warm_up(self) -> None: ...

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """Unit-length float32 vectors, shape (len(texts), dim), C-contiguous."""
        ...


class VectorIndex(Protocol):
    ntotal: int
    dim: int

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]: ...


class DocStore(Protocol):
    def __len__(self) -> int: ...

    def get_many(self, ids: Sequence[int]) -> list[Chunk]: ...


class Generator(Protocol):
    """What the pipeline needs of a generation backend (``generators.make_generator`` builds
    one from ``generate.backend``: vLLM in-process, or remote OpenAI-compatible servers).

    Optional, looked up with ``getattr`` by ``RAG``: ``alive() -> bool`` (False: answer 503),
    ``unfinished() -> int`` (requests held), ``async reset_prefix_cache() -> bool``,
    ``stats() -> dict`` (in ``rag.stats()["generator"]``) and ``async aclose()`` (awaited by
    ``RAG.close`` instead of ``shutdown``).
    """

    model_name: str

    def warm_up(self) -> None:
        """Start the backend (idempotent and cheap once done: it is called per request)."""
        ...

    def tokenizer(self) -> Any:
        """The model's tokenizer (``apply_chat_template``, ``encode``, ``decode``)."""
        ...

    async def generate(self, prompt: str, request_id: str, *, token_ids: list[int] | None = None) -> Generation:
        """``token_ids``: the same prompt already tokenized, when the caller has it."""
        ...

    def stream(self, prompt: str, request_id: str, *, token_ids: list[int] | None = None,
               deltas: bool = True) -> AsyncIterator[str | Generation]:
        """Text deltas as they are generated, then the final ``Generation``. With
        ``deltas=False`` the caller reads only the ``Generation`` (a backend may then skip
        the pieces). The pipeline answers every request through this one method. With
        ``generate.scheduling = "priority"`` it is also given ``priority=`` (an int, lower
        runs earlier): a backend that schedules by priority must then take it."""
        ...

    def shutdown(self) -> None: ...
