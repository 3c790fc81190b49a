"""``ragserve calibrate-semantic``: certify a threshold for the semantic answer tier."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ragserve.cli.app import ConfigOpt, app, fails_cleanly, load_config, out

XQUAD_HINT = "../shared/data/xquad-en/xquad.en.json"


@app.command("calibrate-semantic")
@fails_cleanly
def calibrate_semantic_cmd(
    pairs: Annotated[Path, typer.Argument(help="A SQuAD-style .json file (pairs are built from it: "
                                               "docs/semantic.md) or labelled pairs in .jsonl "
                                               "(cached, new, right, optional group).")],
    alpha: Annotated[float, typer.Option(help="The false-hit rate to certify (among served hits).")] = 0.01,
    delta: Annotated[float, typer.Option(help="1 - delta is the confidence of the certificate.")] = 0.05,
    guard: Annotated[str, typer.Option(help="off, entities or strict (see docs/semantic.md).")] = "strict",
    seed: Annotated[int, typer.Option(help="Seed of the split by paragraph.")] = 0,
    floor: Annotated[float, typer.Option(help="The lowest threshold that may be chosen (docs/semantic.md).")] = 0.8,
    write: Annotated[Optional[Path], typer.Option(
        "--write", help="Put the certified [semantic] section into this TOML config file (only if certified).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the full report as JSON.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Choose the semantic tier's threshold by Learn-then-Test so that the false-hit rate is
    at most ALPHA with confidence 1 - DELTA, and report it on a held-out test split. Exits 1
    and turns nothing on when the pairs cannot certify ALPHA."""
    from ragserve.errors import CalibrationError, DatasetError
    from ragserve.eval.calibrate import calibrate_semantic, write_semantic_config

    if not pairs.is_file():
        raise DatasetError(pairs, f"no such file (XQuAD, for example, is at {XQUAD_HINT})")
    report = calibrate_semantic(pairs, load_config(config), alpha=alpha, delta=delta, guard=guard, seed=seed,
                                floor=floor)
    if json_path is not None:
        import orjson

        json_path.write_bytes(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
                              + b"\n")
    print_calibration(report)
    if not report.certified:
        raise CalibrationError(f"no threshold certifies a false-hit rate <= {alpha} with confidence {1 - delta} "
                               "on these pairs (too few served pairs, or too many wrong ones near every "
                               "threshold): the semantic tier stays off")
    if write is not None:
        write_semantic_config(write, report)
        out.print(f"[semantic] written to {write}", markup=False)


def print_calibration(r: Any) -> None:
    from rich.table import Table

    out.print(f"model {r.model}, guard {r.guard}, alpha {r.alpha}, delta {r.delta}, floor {r.floor}; pairs: "
              + "; ".join(f"{split} {sum(k.values())}" for split, k in r.pairs.items()))
    if r.certified:
        t = r.test
        lo, hi = t["interval_95"]
        out.print(f"threshold {r.threshold} (certified on {r.calibration['served']} served calibration pairs, "
                  f"{r.calibration['errors']} wrong, p = {r.calibration['p_value']:.4f})")
        out.print(f"test: {t['served_hits']} served hits, {t['false_hits']} false "
                  f"(rate {t['false_hit_rate']:.4f}, upper bound {t['upper_bound']:.4f} at {1 - r.delta:.0%}, "
                  f"95% interval [{lo:.4f}, {hi:.4f}]); {t['hit_rate_of_positives']:.1%} of the test positives served")
        e = r.guard_effect
        out.print(f"the guard refused {e['refused']} of {e['above_threshold']} test pairs above the threshold: "
                  f"{e['false_hits_removed']} false hits removed, {e['hits_lost']} hits lost")
    table = Table("guard", "certified threshold", "test served", "false hits", "right served", "perturbed served")
    for g in r.guards:
        table.add_row(g.guard, "-" if g.threshold is None else str(g.threshold), str(g.test_served),
                      str(g.test_false_hits), str(g.test_right_served), str(g.perturbed_served))
    out.print(table)
