"""``ragserve calibrate-semantic``: the semantic tier's threshold, with a guarantee.

The tier serves a cached answer when the nearest cached question's cosine similarity is at
least λ and the guard passes. A *false hit* is a served answer that is wrong for the new
question. Calibration picks λ so that, with probability at least 1 − δ over the draw of the
calibration pairs,

    P(wrong | served at λ) ≤ α        (the false-hit rate among served hits)

by **Learn-then-Test** (Angelopoulos et al., 2021) with fixed-sequence testing:

1. The pairs are split by paragraph into *tune* (20 %), *calibration* (40 %) and *test*
   (40 %); test is never seen by the choice of λ.
2. On *tune*, the order of the tests is learnt: it starts at the grid threshold whose
   binomial p-value is smallest and walks towards more permissive thresholds (LTT allows
   any order fixed before the calibration data is looked at).
3. On *calibration*, each λ in that order tests H0: "false-hit rate > α" with the exact
   binomial p-value P(Binomial(n_served, α) ≤ errors). Every λ before the first H0 that
   stands is certified (no multiplicity correction needed: fixed-sequence testing controls
   the family-wise error at δ); the last one certified is chosen — the most permissive.
   If the first test fails, no λ is certified: ``CalibrationError``, the tier stays off.
   The threshold is a grid value, never rounded.
4. On *test*, the report gives the served hits, the observed false hits, the
   Clopper–Pearson upper bound at 1 − δ (one-sided) and the 95 % interval.

What the guarantee assumes: pairs are exchangeable draws of the traffic the tier will see.
It holds for the pair population built here (``paraphrases.py``: rule rewrites and
same-answer pairs as positives, same-paragraph different-answer questions and perturbed
questions as negatives); real traffic with other paraphrases or another share of near
misses needs its own labelled pairs (``--pairs``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragserve.cache.guard import guard_reason
from ragserve.errors import CalibrationError, DatasetError
from ragserve.eval.paraphrases import PERTURBED_KINDS, Pair, build_pairs, split_by_group

GRID = tuple(round(float(x), 3) for x in np.arange(0.99, 0.499, -0.005))
"""The thresholds tested, strictest first (down to ``floor``)."""
FLOOR = 0.8
"""The lowest threshold calibration may choose by default. NOTE: with the strict guard the
XQuAD pairs hold almost no wrong pair that shares every content word, so nothing in them
stops the certified threshold from sliding to the grid's bottom; similarity is then barely
tested. A floor keeps the tier from relying on the guard alone where the data cannot
show it is safe to (``--floor`` lowers it, knowingly)."""
GUARDS = ("off", "entities", "strict")
SPLITS = (0.2, 0.4, 0.4)


def binomial_pvalue(n: int, errors: int, alpha: float) -> float:
    """P(Binomial(n, alpha) ≤ errors): small when ``errors`` of ``n`` is unlikely under a
    false-hit rate above alpha. 1.0 for n = 0 (nothing served certifies nothing)."""
    if n == 0:
        return 1.0
    from scipy.stats import binom

    return float(binom.cdf(errors, n, alpha))


def clopper_pearson(n: int, errors: int, confidence: float, *, two_sided: bool = False) -> tuple[float, float]:
    """The exact binomial interval for the error rate (one-sided upper bound by default)."""
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import beta

    tail = (1 - confidence) / 2 if two_sided else 1 - confidence
    lo = 0.0 if errors == 0 else float(beta.ppf(tail, errors, n - errors + 1))
    hi = 1.0 if errors == n else float(beta.ppf(1 - tail, errors + 1, n - errors))
    return lo, hi


@dataclass
class ScoredPairs:
    """Pairs with their similarity and, per guard mode, whether the guard passes."""

    pairs: list[Pair]
    similarity: np.ndarray
    passes: dict[str, np.ndarray]

    @property
    def right(self) -> np.ndarray:
        return np.array([p.right for p in self.pairs], bool)

    def subset(self, rows: Sequence[Pair]) -> ScoredPairs:
        ids = {id(p) for p in rows}
        mask = np.array([id(p) in ids for p in self.pairs], bool)
        return ScoredPairs([p for p, m in zip(self.pairs, mask, strict=True) if m], self.similarity[mask],
                           {g: v[mask] for g, v in self.passes.items()})

    def served(self, threshold: float, guard: str) -> np.ndarray:
        return (self.similarity >= threshold) & self.passes[guard]

    def counts(self, threshold: float, guard: str) -> tuple[int, int]:
        """(served, wrong among them)."""
        s = self.served(threshold, guard)
        return int(s.sum()), int((s & ~self.right).sum())


def score_pairs(pairs: Sequence[Pair], encode: Callable[[list[str]], np.ndarray]) -> ScoredPairs:
    """Embed each distinct question once (``encode``: unit vectors); cosine per pair."""
    texts = sorted({t for p in pairs for t in (p.cached, p.new)})
    row = {t: i for i, t in enumerate(texts)}
    vectors = np.asarray(encode(texts), np.float32)
    a = vectors[[row[p.cached] for p in pairs]]
    b = vectors[[row[p.new] for p in pairs]]
    sims = np.einsum("ij,ij->i", a, b)
    passes = {g: np.array([guard_reason(p.new, p.cached, g) is None for p in pairs], bool) for g in GUARDS}
    return ScoredPairs(list(pairs), sims, passes)


def learn_then_test(tune: ScoredPairs, cal: ScoredPairs, guard: str, alpha: float,
                    delta: float, floor: float = FLOOR) -> tuple[float | None, list[dict[str, Any]]]:
    """The most permissive grid threshold (>= ``floor``) certified by fixed-sequence
    testing, or None; and the trace of the tests (threshold, served, errors, p-value)."""
    grid = [t for t in GRID if t >= floor]
    tune_p = [binomial_pvalue(*tune.counts(t, guard), alpha) for t in grid]
    start = int(np.argmin(tune_p))  # the first minimum: the strictest among equals
    certified, trace = None, []
    for t in grid[start:]:
        n, errors = cal.counts(t, guard)
        p = binomial_pvalue(n, errors, alpha)
        trace.append({"threshold": t, "served": n, "errors": errors, "p_value": p})
        if p > delta:
            break
        certified = t
    return certified, trace


@dataclass
class GuardRow:
    guard: str
    threshold: float | None
    test_served: int = 0
    test_false_hits: int = 0
    test_right_served: int = 0
    perturbed_served: int = 0


@dataclass
class CalibrationReport:
    alpha: float
    delta: float
    guard: str
    model: str
    floor: float
    threshold: float | None
    certified: bool
    pairs: dict[str, dict[str, int]]
    """Per split, pairs by kind."""
    calibration: dict[str, Any]
    test: dict[str, Any]
    guards: list[GuardRow] = field(default_factory=list)
    """Each guard mode calibrated the same way, and what it serves on test."""
    guard_effect: dict[str, int] = field(default_factory=dict)
    """At the chosen threshold on test: what the chosen guard removed against no guard."""
    trace: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kinds(pairs: Sequence[Pair]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in pairs:
        out[p.kind] = out.get(p.kind, 0) + 1
    return out


def _test_row(test: ScoredPairs, guard: str, threshold: float | None) -> GuardRow:
    if threshold is None:
        return GuardRow(guard, None)
    s = test.served(threshold, guard)
    right = test.right
    perturbed = np.array([p.kind in PERTURBED_KINDS for p in test.pairs], bool)
    return GuardRow(guard, threshold, int(s.sum()), int((s & ~right).sum()), int((s & right).sum()),
                    int((s & perturbed).sum()))


def calibrate_pairs(scored: ScoredPairs, *, alpha: float = 0.01, delta: float = 0.05, guard: str = "strict",
                    model: str = "", seed: int = 0, floor: float = FLOOR) -> CalibrationReport:
    """Learn-then-Test on scored pairs (see the module's docstring); never raises for a
    threshold it cannot certify: ``report.certified`` is False then."""
    if not 0 < alpha < 1 or not 0 < delta < 1:
        raise CalibrationError(f"alpha and delta must be in (0, 1), got alpha={alpha}, delta={delta}")
    if not GRID[-1] <= floor <= GRID[0]:
        raise CalibrationError(f"floor must be in [{GRID[-1]}, {GRID[0]}], got {floor}")
    if guard not in GUARDS:
        raise CalibrationError(f"guard must be one of {', '.join(GUARDS)}, got {guard!r}")
    parts = split_by_group(scored.pairs, SPLITS, seed)
    tune, cal, test = (scored.subset(p) for p in parts)
    rows, chosen, chosen_trace = [], None, []
    for g in GUARDS:
        t, trace = learn_then_test(tune, cal, g, alpha, delta, floor)
        rows.append(_test_row(test, g, t))
        if g == guard:
            chosen, chosen_trace = t, trace
    cal_info: dict[str, Any] = {"pairs": len(cal.pairs), "tune_pairs": len(tune.pairs)}
    test_info: dict[str, Any] = {"pairs": len(test.pairs), "positives": int(test.right.sum()),
                                 "perturbed_negatives": int(sum(p.kind in PERTURBED_KINDS for p in test.pairs))}
    effect: dict[str, int] = {}
    if chosen is not None:
        n, errors = cal.counts(chosen, guard)
        cal_info.update(served=n, errors=errors, p_value=binomial_pvalue(n, errors, alpha))
        n, errors = test.counts(chosen, guard)
        test_info.update(served_hits=n, false_hits=errors, false_hit_rate=errors / n if n else 0.0,
                         upper_bound=clopper_pearson(n, errors, 1 - delta)[1],
                         interval_95=list(clopper_pearson(n, errors, 0.95, two_sided=True)),
                         hit_rate_of_positives=round(int((test.served(chosen, guard) & test.right).sum())
                                                     / max(1, int(test.right.sum())), 4))
        above = test.similarity >= chosen
        refused = above & ~test.passes[guard]
        effect = {"above_threshold": int(above.sum()), "refused": int(refused.sum()),
                  "false_hits_removed": int((refused & ~test.right).sum()),
                  "hits_lost": int((refused & test.right).sum())}
    return CalibrationReport(alpha, delta, guard, model, floor, chosen, chosen is not None,
                             {name: _kinds(p) for name, p in zip(("tune", "calibration", "test"), parts, strict=True)},
                             cal_info, test_info, rows, effect, chosen_trace)


def load_pairs(path: Path) -> list[Pair]:
    """Labelled pairs from a ``.jsonl`` file (``cached``, ``new``, ``right``, optional
    ``kind`` and ``group``), or built from a SQuAD-style ``.json`` file."""
    if path.suffix != ".jsonl":
        return build_pairs(path)
    pairs = []
    for i, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            pairs.append(Pair(str(d["cached"]), str(d["new"]), bool(d["right"]), str(d.get("kind", "given")),
                              int(d.get("group", i))))
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(path, f"line {i}: expected cached, new, right: {e}") from None
    if not pairs:
        raise DatasetError(path, "no pairs")
    return pairs


def semantic_section(report: CalibrationReport) -> str:
    """The ``[semantic]`` TOML section a certified report turns on."""
    return ("[semantic]\n"
            f"# ragserve calibrate-semantic: false-hit rate <= {report.alpha} with confidence {1 - report.delta}\n"
            "enabled = true\n"
            f"threshold = {report.threshold}\n"
            f'guard = "{report.guard}"\n'
            f'calibrated_model = "{report.model}"\n'
            f"alpha = {report.alpha}\n"
            f"delta = {report.delta}\n")


def write_semantic_config(path: Path, report: CalibrationReport) -> None:
    """Put the ``[semantic]`` section into a TOML file (replacing one already there);
    refuses an uncertified report: the tier is never turned on without a certificate."""
    if not report.certified:
        raise CalibrationError("not writing the config: no threshold was certified")
    text = path.read_text("utf-8") if path.exists() else ""
    text = re.sub(r"(?ms)^\[semantic\]\n.*?(?=^\[|\Z)", "", text).rstrip()
    path.write_text((text + "\n\n" if text else "") + semantic_section(report), "utf-8")


def calibrate_semantic(source: Path | str, config: Any, *, alpha: float = 0.01, delta: float = 0.05,
                       guard: str = "strict", seed: int = 0, floor: float = FLOOR,
                       embedder: Any = None) -> CalibrationReport:
    """Calibrate for the embedding model of ``config`` (``RAGConfig``; or ``embedder``) on
    the pairs of ``source`` (a SQuAD-style .json, or labelled pairs in .jsonl)."""
    if embedder is None:
        from ragserve.retrieval.embed import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder(config.embed)
        embedder.warm_up()
    pairs = load_pairs(Path(source))
    scored = score_pairs(pairs, lambda texts: embedder.encode(texts))
    return calibrate_pairs(scored, alpha=alpha, delta=delta, guard=guard, seed=seed, floor=floor,
                           model=str(embedder.identity.get("name", "")))
