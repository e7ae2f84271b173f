"""Seed statistics for ablation tables: mean ± std (n), t confidence intervals, paired differences.

Definitions (every table of `comic.studies` uses them, and `tests/test_stats.py` checks them by hand):

- mean ± std (n): the sample standard deviation (ddof = 1) over the n seeds that finished; NaN when n < 2.
- 95 % confidence interval of a mean: mean ± t(0.975, n − 1) · std / sqrt(n) (Student's t, as seeds are few).
- Paired difference against the reference arm: d_s = arm_s − reference_s over the seeds present in both arms
  (same seed = same initialisation and data order), with its mean, the 95 % t interval of that mean, and the
  two-sided paired t-test p-value (`scipy.stats.ttest_rel`).
- "Within noise": the 95 % interval of the paired difference contains 0 (equivalently p >= 0.05). With fewer than
  two pairs nothing can be said and the flag is None. When every d_s is identical (a spread below 1e-9 of the
  mean: float rounding) the interval collapses to that value and p is 1 if it is 0, else 0.
- Gap closed: an arm's position between a floor arm and a ceiling arm on the same seed,
  g_s = 100 · (arm_s − floor_s) / (ceiling_s − floor_s), summarised over seeds like any metric: 0 % = the floor,
  100 % = the ceiling, above 100 % beyond it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
SAME_SPREAD = 1e-9  # relative spread below which the paired differences count as identical


@dataclass(frozen=True)
class Summary:
    """mean ± std over n seeds and the t confidence interval of the mean."""

    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Paired:
    """The paired difference arm − reference over `n` common seeds."""

    n: int
    diff: float
    diff_std: float
    ci_low: float
    ci_high: float
    p_value: float
    within_noise: bool | None


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student t critical value: t((1 + confidence) / 2, df)."""
    return float(stats.t.ppf(0.5 + confidence / 2, df))


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    return x[np.isfinite(x)]


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """mean, sample std (ddof 1), n and the t interval of the mean over the finite `values`."""
    x = _finite(values)
    n = int(x.size)
    if n == 0:
        return Summary(math.nan, math.nan, 0, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Summary(mean, math.nan, 1, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = t_quantile(n - 1, confidence) * std / math.sqrt(n)
    return Summary(mean, std, n, mean - half, mean + half)


def paired(reference: Mapping[Any, float], arm: Mapping[Any, float], confidence: float = CONFIDENCE) -> Paired:
    """arm − reference over the seeds (keys) where both are finite; see the module docstring for the rules."""
    seeds = sorted(s for s in set(reference) & set(arm) if math.isfinite(reference[s]) and math.isfinite(arm[s]))
    d = np.array([arm[s] - reference[s] for s in seeds], dtype=np.float64)
    n = int(d.size)
    if n < 2:
        diff = float(d.mean()) if n else math.nan
        return Paired(n, diff, math.nan, math.nan, math.nan, math.nan, None)
    summary = summarize(d, confidence)
    if summary.std <= SAME_SPREAD * max(1.0, abs(summary.mean)):  # float rounding of equal differences: no t-test
        p_value = 1.0 if summary.mean == 0 else 0.0
        low = high = summary.mean
    else:
        p_value = float(stats.ttest_rel([arm[s] for s in seeds], [reference[s] for s in seeds]).pvalue)
        low, high = summary.ci_low, summary.ci_high
    return Paired(n, summary.mean, summary.std, low, high, p_value, bool(low <= 0 <= high))


def compare_arms(values: Mapping[str, Mapping[Any, float]], references: Mapping[str, str | None],
                 confidence: float = CONFIDENCE) -> list[dict[str, Any]]:
    """One metric over arms: `values[arm][seed]`, `references[arm]` (None for a reference arm itself).

    Returns one row per arm: arm, mean, std, n, ci_low, ci_high, reference, and the paired fields (n_pairs, diff,
    diff_std, diff_ci_low, diff_ci_high, p_value, within_noise; NaN / None for reference arms).
    """
    rows = []
    for arm, by_seed in values.items():
        row: dict[str, Any] = {"arm": arm, **asdict(summarize(list(by_seed.values()), confidence))}
        ref = references.get(arm)
        if ref is None or ref == arm:
            pair = Paired(0, math.nan, math.nan, math.nan, math.nan, math.nan, None)
        else:
            pair = paired(values.get(ref, {}), by_seed, confidence)
        row |= {"reference": ref if ref != arm else None, "n_pairs": pair.n, "diff": pair.diff,
                "diff_std": pair.diff_std, "diff_ci_low": pair.ci_low, "diff_ci_high": pair.ci_high,
                "p_value": pair.p_value, "within_noise": pair.within_noise}
        rows.append(row)
    return rows


def gap_closed(values: Mapping[str, Mapping[Any, float]], floor: str, ceiling: str) -> dict[str, dict[Any, float]]:
    """`values[arm][seed]` -> the % of the floor-to-ceiling gap each arm closes on each seed (see the module
    docstring); seeds where floor or ceiling is missing, or the two are equal, are left out."""
    low, high = values.get(floor, {}), values.get(ceiling, {})
    out: dict[str, dict[Any, float]] = {}
    for arm, by_seed in values.items():
        out[arm] = {s: 100.0 * (v - low[s]) / (high[s] - low[s]) for s, v in by_seed.items()
                    if s in low and s in high and math.isfinite(v) and high[s] != low[s]}
    return out


def _by_arm(finished: pd.DataFrame, key: str, arms: Sequence[str]) -> dict[str, dict[Any, float]]:
    values: dict[str, dict[Any, float]] = {arm: {} for arm in arms}
    if key in finished:
        for arm, seed, value in zip(finished["arm"], finished["seed"], finished[key], strict=True):
            if arm in values:
                values[arm][int(seed)] = float(value)
    return values


def aggregate_gap(rows: pd.DataFrame, columns: Mapping[str, str], floor: str, ceiling: str, arms: Sequence[str],
                  confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Like `aggregate`, of the gap each arm closes between `floor` and `ceiling` (in %, per seed) instead of
    the metric itself; no paired differences."""
    finished = rows[rows["state"] == "finished"] if len(rows) else rows
    out = []
    for label, key in columns.items():
        gaps = gap_closed(_by_arm(finished, key, arms), floor, ceiling)
        out += [{"metric": label, "key": key, **row} for row in compare_arms(gaps, {}, confidence)]
    return pd.DataFrame(out)


def aggregate(rows: pd.DataFrame, columns: Mapping[str, str], references: Mapping[str, str | None],
              arms: Sequence[str], confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Long table of `compare_arms` over the finished rows: one row per (metric, arm), metrics in `columns` order
    (label -> metric key), arms in `arms` order. `rows` needs columns arm, seed, state and the metric keys."""
    finished = rows[rows["state"] == "finished"] if len(rows) else rows
    out = []
    for label, key in columns.items():
        values = _by_arm(finished, key, arms)
        out += [{"metric": label, "key": key, **row} for row in compare_arms(values, references, confidence)]
    return pd.DataFrame(out)
