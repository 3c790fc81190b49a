"""Which FAISS index to build, with which parameters: the plan a build follows and the
manifest records.

Every type but the reference stores vectors as float16 codes (2·d bytes per vector):

| type | FAISS | search |
|---|---|---|
| ``flat-fp16`` | ``SQfp16`` (IndexScalarQuantizer QT_fp16) | exhaustive |
| ``ivf-fp16`` | ``IVF{nlist},SQfp16`` | ``nprobe`` of ``nlist`` lists |
| ``hnsw-fp16`` | ``HNSW{m},SQfp16`` | graph walk, ``efSearch`` candidates |
| ``flat-fp32`` | ``Flat`` (IndexFlatIP) | exhaustive, exact: the reference |

``auto`` picks by corpus size (see ``choose_index_type``). Build parameters (nlist, m,
efConstruction) are fixed in the file; query-time parameters (nprobe, efSearch) are
recorded as defaults and can be overridden by config without a rebuild.

**Usage:**

    spec = plan_index(n_chunks, IndexConfig(index_type="auto"))
    spec.factory          # e.g. "HNSW32,SQfp16"
    spec.to_manifest()    # {"type": "hnsw-fp16", "params": {...}, ...}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ragserve.config import IndexConfig
from ragserve.errors import ConfigError

INDEX_TYPES = ("flat-fp16", "ivf-fp16", "hnsw-fp16", "flat-fp32")

# NOTE on the ``auto`` thresholds, measured on this machine kind (2 cores, 384-d, FAISS 1.15,
# benchmarks/bench_scale.py): exhaustive SQfp16 scans every code for a query, ~2.3 ms per 100k
# vectors (p50 at 1M: 22.8 ms on an idle machine), growing linearly. Up to 100k chunks
# that stays within a few milliseconds and is exact up to fp16 rounding, so nothing
# approximate is worth it. Above that HNSW gives the best latency for a given recall: at 1M
# clustered vectors, M 32 and efConstruction 200, recall@10 0.999 at 0.31 ms (efSearch 128).
# Its build costs ~0.35 ms per vector on 2 idle cores (350 s per million; several times
# that with other jobs on the cores) and its graph adds ~270 B per vector. Past 2M chunks
# the build would take an hour or more here, so IVF (k-means on a sample, then a cheap add;
# lists mapped from disk) is the scalable default: at 1M clustered, nprobe 16 of 4000
# gives 0.9995 at 0.36 ms after a 51 s build.
AUTO_FLAT_MAX = 100_000
AUTO_HNSW_MAX = 2_000_000

IVF_POINTS_PER_LIST = 64
"""Training sample size per inverted list. FAISS warns below 39 and samples 256 by default;
64 keeps k-means within minutes at a million chunks on 2 cores."""
IVF_MIN_POINTS_PER_LIST = 39
IVF_MAX_NLIST = 65_536
IVF_KMEANS_ITERATIONS = 10
"""What FAISS's own IVF training uses (``Level1Quantizer.cp.niter``)."""
HNSW_DEFAULT_EF_SEARCH = 128

# NOTE on reusing IVF centroids in an incremental build (a starting point, not measured at
# scale): the centroids are kept while the planned list count stays within a factor of 2
# of theirs and the corpus's mean cosine to its nearest centroid (``quantizer_fit``) has
# not fallen more than 0.05 below its value when they were trained. Past that, lists get
# uneven or far from their vectors and the same nprobe finds fewer true neighbours.
IVF_NLIST_SLACK = 2.0
IVF_DRIFT_TOLERANCE = 0.05


@dataclass(frozen=True)
class IndexSpec:
    """An index type with the parameters that built it and the query-time defaults."""

    index_type: str
    nlist: int = 0
    """ivf-fp16: inverted lists (k-means centroids)."""
    train_size: int = 0
    """ivf-fp16: vectors sampled to train the centroids."""
    nprobe: int = 0
    """ivf-fp16: lists scanned per query by default."""
    m: int = 0
    """hnsw-fp16: graph neighbours per node (2·m on the bottom layer)."""
    ef_construction: int = 0
    """hnsw-fp16: candidate list size while building the graph."""
    ef_search: int = 0
    """hnsw-fp16: candidate list size per query by default."""
    requested: dict[str, Any] = field(default_factory=dict, compare=False)
    """The build-time config as given (``index_type`` may be ``auto``)."""
    reason: str = ""
    """Why ``auto`` chose this type (empty when the type was named)."""

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {', '.join(INDEX_TYPES)}, got {self.index_type!r}")

    @property
    def factory(self) -> str:
        """The FAISS ``index_factory`` string."""
        return {
            "flat-fp16": "SQfp16",
            "ivf-fp16": f"IVF{self.nlist},SQfp16",
            "hnsw-fp16": f"HNSW{self.m},SQfp16",
            "flat-fp32": "Flat",
        }[self.index_type]

    @property
    def params(self) -> dict[str, int]:
        if self.index_type == "ivf-fp16":
            return {"nlist": self.nlist, "train_size": self.train_size, "nprobe": self.nprobe}
        if self.index_type == "hnsw-fp16":
            return {"m": self.m, "ef_construction": self.ef_construction, "ef_search": self.ef_search}
        return {}

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.index_type, "faiss": self.factory, "metric": "inner_product",
                               "params": self.params, "requested": self.requested}
        if self.reason:
            out["auto"] = self.reason
        return out

    @classmethod
    def from_manifest(cls, section: dict[str, Any]) -> IndexSpec:
        """The spec recorded in a manifest's ``index`` section (older manifests: no params)."""
        return cls(index_type=section["type"], **section.get("params", {}),
                   requested=section.get("requested", {}), reason=section.get("auto", ""))


def choose_index_type(n: int) -> tuple[str, str]:
    """The type ``auto`` picks for ``n`` chunks, and why (see the NOTE above the thresholds).

    **Usage:** ``choose_index_type(300_000)`` → ``("hnsw-fp16", "...")``
    """
    if n <= AUTO_FLAT_MAX:
        return "flat-fp16", f"{n} chunks <= {AUTO_FLAT_MAX}: an exhaustive scan is fast and exact"
    if n <= AUTO_HNSW_MAX:
        return "hnsw-fp16", f"{n} chunks <= {AUTO_HNSW_MAX}: HNSW has the best latency per recall"
    return "ivf-fp16", f"{n} chunks > {AUTO_HNSW_MAX}: an HNSW build would take hours; IVF trains on a sample"


def choose_nlist(n: int) -> int:
    """About 4·√n lists, but never fewer than 39 training points per list, at most 65536.

    **Usage:** ``choose_nlist(1_000_000)`` → ``4000``
    """
    by_size = round(4 * math.sqrt(max(n, 1)))
    return max(1, min(by_size, n // IVF_MIN_POINTS_PER_LIST, IVF_MAX_NLIST))


def default_nprobe(nlist: int) -> int:
    """About √nlist probes (at least 16, at most nlist): a starting point; measure recall
    on your data with ``ragserve eval`` and set ``index.ivf_nprobe``."""
    return max(1, min(nlist, max(16, round(math.sqrt(nlist)))))


def requested_build(config: IndexConfig) -> dict[str, Any]:
    """The config fields that decide what is built (not the query-time ones), as the
    manifest records them: two builds with equal values over equal chunks are the same."""
    return {"index_type": config.index_type, "ivf_nlist": config.ivf_nlist, "hnsw_m": config.hnsw_m,
            "hnsw_ef_construction": config.hnsw_ef_construction}


def plan_index(n: int, config: IndexConfig) -> IndexSpec:
    """Resolve ``auto`` and every zero ("pick for me") parameter for a corpus of ``n`` chunks.

    **Usage:** ``plan_index(len(vectors), RAGConfig.load().index)``
    """
    requested = requested_build(config)
    index_type, reason = config.index_type, ""
    if index_type == "auto":
        index_type, reason = choose_index_type(n)
    if index_type == "ivf-fp16":
        nlist = config.ivf_nlist or choose_nlist(n)
        if nlist > n:
            raise ConfigError("index.ivf_nlist", f"{nlist} lists for {n} chunks: use at most {n}, or 0 to choose")
        return IndexSpec(index_type, nlist=nlist, train_size=min(n, IVF_POINTS_PER_LIST * nlist),
                         nprobe=min(nlist, config.ivf_nprobe or default_nprobe(nlist)),
                         requested=requested, reason=reason)
    if index_type == "hnsw-fp16":
        return IndexSpec(index_type, m=config.hnsw_m, ef_construction=config.hnsw_ef_construction,
                         ef_search=config.hnsw_ef_search or HNSW_DEFAULT_EF_SEARCH,
                         requested=requested, reason=reason)
    return IndexSpec(index_type, requested=requested, reason=reason)


def reuse_ivf_quantizer(previous: dict[str, Any], planned: IndexSpec, n: int,
                        config: IndexConfig) -> tuple[IndexSpec | None, str]:
    """Whether the previous index's IVF centroids may serve ``n`` chunks (before drift is
    measured): the spec to build with them, or None and why they must be retrained.

    **Usage:** ``spec, why = reuse_ivf_quantizer(old_manifest["index"], plan_index(n, cfg), n, cfg)``
    """
    if previous.get("type") != "ivf-fp16":
        return None, f"the previous index is {previous.get('type')}, not ivf-fp16"
    if "fit" not in previous.get("quantizer", {}):
        return None, "the previous index records no quantizer fit"
    old = IndexSpec.from_manifest(previous)
    if config.ivf_nlist and config.ivf_nlist != old.nlist:
        return None, f"index.ivf_nlist is {config.ivf_nlist}, the centroids are {old.nlist}"
    if old.nlist > n // IVF_MIN_POINTS_PER_LIST:
        return None, f"{n} chunks are too few for {old.nlist} lists"
    if not config.ivf_nlist and not old.nlist / IVF_NLIST_SLACK <= planned.nlist <= old.nlist * IVF_NLIST_SLACK:
        return None, f"the corpus is now {n} chunks: about {planned.nlist} lists fit it, the centroids are {old.nlist}"
    nprobe = min(old.nlist, config.ivf_nprobe or default_nprobe(old.nlist))
    return replace(planned, nlist=old.nlist, train_size=old.train_size, nprobe=nprobe), ""


def drift(trained_fit: float, fit_now: float) -> str:
    """Why the centroids must be retrained for drift ("" when they still fit)."""
    if fit_now >= trained_fit - IVF_DRIFT_TOLERANCE:
        return ""
    return (f"drift: mean cosine to the nearest centroid fell from {trained_fit:.3f} to {fit_now:.3f} "
            f"(more than {IVF_DRIFT_TOLERANCE})")
