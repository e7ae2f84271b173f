"""A study's claims decided over test images as well as seeds: per-fold and pooled verdicts from the cells' per-image
test scores (`comic.engine`, statistics in `comic.report.bootstrap`).

Every arm is paired with its reference arm (and the spec's `also_against` arm) on the columns that are an mAP of
the test images (total, many / medium / few, average). For each fold: the seed-paired t-test as in the other tables
(training noise only, one test set) and the paired bootstrap over test images and seeds; pooled over the folds: the
stratified bootstrap's CI and the verdict, 'holds' only when that CI excludes 0 and every fold agrees in sign.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from comic.engine import BestTestScores
from comic.report import tables
from comic.report.bootstrap import Bootstrapper, FoldScores, PooledDiff

# best/test/<name> columns the bootstrap recomputes from the scores, by their metric name there.
BOOTSTRAP_METRICS = {f"best/test/{m}": m for m in ("map", "map_many", "map_medium", "map_few", "map_avg")}
RESAMPLES = 2000

RULE = ("Δ = arm − reference, mean over folds of the per-fold mean over seeds; 95% CI: paired percentile bootstrap "
        f"({RESAMPLES} resamples) over the test images of each fold and the seeds, stratified by fold "
        "(`comic/report/bootstrap.py`). Verdict: 'holds' = the pooled CI excludes 0 and every fold's Δ has its sign; "
        "'mixed' = the folds disagree in sign; otherwise 'within noise'. Fold signs in fold order.")


def bootstrap_columns(columns: Mapping[str, str]) -> dict[str, str]:
    """The spec's columns (label -> metric key) that the bootstrap can recompute from test scores."""
    return {label: key for label, key in columns.items() if key in BOOTSTRAP_METRICS}


def arm_folds(rows: pd.DataFrame, scores: Mapping[str, BestTestScores]) -> dict[str, dict[int, FoldScores]]:
    """arm -> fold -> its seeds' test scores, from the finished cells (rows: key, arm, fold, seed, state)."""
    grouped: dict[str, dict[int, dict[int, BestTestScores]]] = {}
    for row in rows.to_dict("records"):
        if row["key"] in scores:
            grouped.setdefault(row["arm"], {}).setdefault(int(row["fold"]), {})[int(row["seed"])] = scores[row["key"]]
    out: dict[str, dict[int, FoldScores]] = {}
    for arm, folds in grouped.items():
        out[arm] = {}
        for fold, by_seed in folds.items():
            first = next(iter(by_seed.values()))
            out[arm][fold] = FoldScores(first.image_ids, first.targets, {s: t.scores for s, t in by_seed.items()},
                                        first.train_counts)
    return out


def decide(rows: pd.DataFrame, scores: Mapping[str, BestTestScores], columns: Mapping[str, str],
           references: Mapping[str, str | None], bootstrapper: Bootstrapper | None = None) -> pd.DataFrame:
    """One row per (arm, metric label, fold or 'pooled'): the difference against the arm's reference, its bootstrap
    CI, the seed t-test (folds), the fold signs and the verdict (pooled). Pass one `bootstrapper` to every call of a
    study: all pairs then see the same resamples, and each arm's metrics are computed once."""
    bootstrapper = bootstrapper or Bootstrapper(RESAMPLES)
    by_arm = arm_folds(rows, scores)
    chosen = bootstrap_columns(columns)
    names = [BOOTSTRAP_METRICS[key] for key in chosen.values()]
    out: list[dict[str, Any]] = []
    for arm, ref in references.items():
        if ref is None or arm not in by_arm or ref not in by_arm:
            continue
        result = bootstrapper.compare(by_arm[ref], by_arm[arm], metrics=names)
        for label, key in chosen.items():
            out += _rows(arm, ref, label, result[BOOTSTRAP_METRICS[key]])
    return pd.DataFrame(out)


def _rows(arm: str, ref: str, label: str, pooled: PooledDiff) -> list[dict[str, Any]]:
    base = {"arm": arm, "reference": ref, "metric": label}
    out = [base | {"fold": "pooled", "diff": pooled.diff, "ci_low": pooled.ci_low, "ci_high": pooled.ci_high,
                   "signs": pooled.signs, "verdict": pooled.verdict,
                   "n_seeds": sum(f.n_seeds for f in pooled.folds), "n_images": sum(f.n_images for f in pooled.folds)}]
    for f in pooled.folds:
        out.append(base | {"fold": str(f.fold), "diff": f.diff, "ci_low": f.ci_low, "ci_high": f.ci_high,
                           "t_low": f.t_low, "t_high": f.t_high, "p_value": f.p_value, "n_seeds": f.n_seeds,
                           "n_images": f.n_images})
    return out


def pooled_table(decided: pd.DataFrame, arms: Sequence[str], labels: Sequence[str], first: str) -> pd.DataFrame:
    """arms × metrics: 'Δ [CI] (fold signs) verdict' of the pooled rows."""
    return _table(decided[decided["fold"] == "pooled"] if len(decided) else decided, arms, labels, first,
                  lambda r: f"{r['diff']:+.2f} {tables.interval(r['ci_low'], r['ci_high'], signed=True)} "
                            f"({r['signs']}) {r['verdict']}")


def fold_table(decided: pd.DataFrame, fold: int, arms: Sequence[str], labels: Sequence[str],
               first: str) -> pd.DataFrame:
    """arms × metrics of one fold: 'Δ, bootstrap CI (images + seeds); t CI, p (seeds)'."""
    return _table(decided[decided["fold"] == str(fold)] if len(decided) else decided, arms, labels, first,
                  lambda r: f"{r['diff']:+.2f} {tables.interval(r['ci_low'], r['ci_high'], signed=True)}; seeds "
                            f"{tables.interval(r['t_low'], r['t_high'], signed=True)} p={_p(r['p_value'])}")


def _p(value: float) -> str:
    return f"{value:.2g}" if isinstance(value, float) and math.isfinite(value) else "-"


def _table(frame: pd.DataFrame, arms: Sequence[str], labels: Sequence[str], first: str, cell) -> pd.DataFrame:
    index = {(r["arm"], r["metric"]): r for r in frame.to_dict("records")}
    rows = []
    for arm in arms:
        row = {first: arm, "vs": next((r["reference"] for (a, _), r in index.items() if a == arm), tables.DASH)}
        for label in labels:
            r = index.get((arm, label))
            row[label] = cell(r) if r is not None and math.isfinite(r["diff"]) else tables.DASH
        rows.append(row)
    return pd.DataFrame(rows, columns=[first, "vs", *labels])
