"""Paired bootstrap of a metric difference between two arms: uncertainty from training seeds AND test images.

The method is the paired percentile bootstrap, stratified by fold (Efron & Tibshirani, An Introduction to the
Bootstrap, 1993: ch. 13, the percentile interval), with two-level (hierarchical) resampling: images within each
fold's test set, and the training seeds of each fold. Definitions and rules (`tests/report/test_bootstrap.py`
checks them against `comic.metrics`, `scipy.stats.bootstrap` and hand-built cases):

- Data: for every (arm, fold, seed) the per-image test scores [N_f, C] of fold f's test images, which are the same
  images (ids, in the same row order) with the same targets for both arms; a mismatch is a ValueError naming the
  fold. Folds compared = those present in both arms; in a fold, seeds = those present in both arms, paired by seed
  (same seed = same initialisation and data order) and indexed in sorted order.
- Metrics (`metric_values`, in percent, as `comic.metrics.evaluate_scores`): 'map' = 100 · mean AP over the
  classes with a positive; 'map_many' / 'map_medium' / 'map_few' the same over a shot group's classes (groups from
  the arm's observed training counts, `metrics.shot_groups`), NaN for a group without an evaluable class; 'map_avg'
  the mean of the finite group values. AP = the non-interpolated AP of `metrics.average_precision`.
- Resamples of fold f: B image-count vectors W_f [B, N_f] ~ Multinomial(N_f, uniform), i.e. N_f images drawn with
  replacement, then, for each b, S seed indices drawn with replacement from the S paired seeds; both from
  `np.random.default_rng([seed, f])`, images first, so every pair of arms compared in one study with the same
  `seed` sees the same image resamples. Images weigh the same in both arms and in every seed of resample b (paired).
- Resampled AP (`weighted_ap`): the AP of the resampled test set, from the counts without materialising it (exact
  for index resampling when scores have no ties; with all counts 1 it is `average_precision`, ties included).
- Point estimate of fold f: Δ_f = mean over the paired seeds of (arm − reference) metric on the whole test set.
- Bootstrap statistic of fold f: Δ_f^b = mean over the drawn seeds of (arm − reference) metric on resample b
  (NaN-aware: NaN seed differences are left out; a b where Δ_f^b is NaN is dropped from the percentiles).
- Fold interval: the (1 − confidence)/2 and (1 + confidence)/2 percentiles (numpy's linear interpolation) of the
  finite Δ_f^b. The seed-paired t-test of the fold (`stats.paired` on the per-seed whole-set metrics: training noise
  only; NaN with fewer than two seeds) is reported beside it.
- Pooled over folds (stratified: each fold resampled within itself, folds fixed and weighing equally):
  Δ = mean over folds of Δ_f, Δ^b = mean over folds of Δ_f^b (NaN if a fold's is), interval = percentiles of Δ^b.
- Verdict: 'holds' iff the pooled interval excludes 0 and every fold's Δ_f has the sign of Δ, strictly (a NaN or
  zero fold does not agree); 'mixed' iff the folds disagree in sign (some Δ_f > 0, some < 0); else 'within noise'.
  A single fold follows the same rule (it trivially agrees with itself).
- A fold without a common seed, or a metric NaN on every seed (e.g. an empty shot group), gives NaN for that fold
  and for the pooled values, and the verdict 'within noise' unless the other folds are 'mixed'.
- Caching: a `Bootstrapper` keeps each fold's resamples and each score array's resampled metrics, so comparing
  many arms against one reference computes the reference once; `compare` makes a fresh one unless given one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from comic.metrics import SHOT_GROUPS, average_precision, shot_groups
from comic.report.stats import CONFIDENCE, paired

METRICS = ("map", "map_many", "map_medium", "map_few", "map_avg")
RESAMPLES = 2000
MINUS = "\u2212"


@dataclass(frozen=True)
class FoldScores:
    """One arm on one fold."""

    image_ids: tuple  # [N] ids of the fold's test images (row order of targets / scores)
    targets: np.ndarray  # [N, C] 0/1
    scores: Mapping[int, np.ndarray]  # seed -> [N, C] float scores at the best-on-val epoch
    train_counts: np.ndarray  # [C] observed training counts of this arm's benchmark (its shot groups)


@dataclass(frozen=True)
class FoldDiff:
    """arm − reference on one fold: point estimate, bootstrap interval and seed-paired t-test."""

    fold: int
    n_seeds: int  # paired seeds (present in both arms)
    n_images: int
    diff: float  # mean over paired seeds of (arm − reference) metric on the fold's whole test set
    ci_low: float  # bootstrap percentile interval, images and seeds resampled
    ci_high: float
    t_low: float  # seed-paired t interval (stats.paired): training noise only
    t_high: float
    p_value: float


@dataclass(frozen=True)
class PooledDiff:
    """arm − reference of one metric, pooled over folds, with its folds and verdict."""

    metric: str
    diff: float  # mean over folds of FoldDiff.diff (folds weigh equally)
    ci_low: float  # percentile interval of the pooled bootstrap statistic
    ci_high: float
    folds: tuple[FoldDiff, ...]
    verdict: str  # 'holds' | 'within noise' | 'mixed'

    @property
    def signs(self) -> str:
        """The folds' signs, e.g. '+ + −' ('0' for exactly 0, '?' for NaN)."""
        return " ".join(_sign(f.diff) for f in self.folds)


def _sign(x: float) -> str:
    if math.isnan(x):
        return "?"
    return "+" if x > 0 else MINUS if x < 0 else "0"


def _harmonic(n: int) -> np.ndarray:
    """[n + 1] harmonic numbers H(0..n), H(0) = 0."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64))])


def weighted_ap(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """scores, targets [N, C]; weights [B, N] nonnegative integer counts (how many times each image is drawn in a
    bootstrap resample) -> AP [B, C], exactly the AP that `average_precision` gives on the resampled rows (index
    resampling) when scores have no ties; with all weights 1 it equals `average_precision` (to float rounding),
    ties included (ties ordered as average_precision's stable sort orders them). NaN where no positive is drawn.
    """
    # Ranks by -score (stable, as average_precision). Image i drawn w_i times takes w_i consecutive ranks (its copies
    # tie with each other, and being identical rows their order among themselves does not matter). With
    # a_i = sum of w·t over the images ranked before i and b_i = sum of w before i (exclusive cumulative sums), the
    # j-th copy of a positive i sits at rank b_i + j with a_i + j positives up to it, so its copies' precisions sum to
    #   sum_{j=1..w} (a + j)/(b + j) = sum_j [1 - (b - a)/(b + j)] = w - (b - a)·(H(b + w) - H(b)),
    # H the harmonic numbers (integer arguments: a lookup table). AP = sum_i t_i·that / sum_i t_i·w_i.
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0
    counts = np.ascontiguousarray(np.asarray(weights).T, dtype=np.float64)  # [N, B]; integer sums stay exact
    order = np.argsort(-scores, axis=0, kind="stable")  # [N, C]
    harmonic = _harmonic(int(counts.sum(axis=0).max(initial=0)))
    out = np.full((counts.shape[1], scores.shape[1]), np.nan)
    for c in range(scores.shape[1]):
        ranked = order[:, c]
        hit = targets[ranked, c]  # [N] by rank
        if hit.any():
            out[:, c] = _ranked_ap(counts, ranked, hit, harmonic)
    return out


def _ranked_ap(counts: np.ndarray, ranked: np.ndarray, hit: np.ndarray, harmonic: np.ndarray) -> np.ndarray:
    """One class: counts [N, B], image indices by rank [N], positive flags by rank [N] (at least one) -> AP [B]."""
    n_pos = int(hit.sum())
    # b_k of the k-th positive = weight of the images ranked before it: the image at rank j is before positive k
    # iff (positives at ranks <= j) <= k, so sum each image into row `positives up to it` and cumulate the rows.
    segment = np.cumsum(hit)
    keep = segment < n_pos
    assign = sparse.csr_matrix((np.ones(int(keep.sum())), (segment[keep], ranked[keep])),
                               shape=(n_pos, counts.shape[0]))
    before = np.cumsum(assign @ counts, axis=0).astype(np.int64)  # [P, B]
    pos_w = counts[ranked[hit]].astype(np.int64)  # [P, B]
    hits_before = np.cumsum(pos_w, axis=0) - pos_w  # a_k
    sums = pos_w - (before - hits_before) * (harmonic[before + pos_w] - harmonic[before])
    drawn = pos_w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(drawn > 0, sums.sum(axis=0) / drawn, np.nan)


def metric_values(ap: np.ndarray, train_counts: np.ndarray) -> dict[str, np.ndarray]:
    """AP [..., C] -> {metric: [...]} in percent for every name in METRICS (groups from train_counts; NaN APs
    excluded; a group without an evaluable class NaN; map_avg the mean of the finite group values)."""
    ap = np.asarray(ap, dtype=np.float64)
    groups = shot_groups(train_counts)
    out = {"map": _mean_percent(ap)}
    for name in SHOT_GROUPS:
        out[f"map_{name}"] = _mean_percent(ap[..., groups == name])
    out["map_avg"] = _nanmean(np.stack([out[f"map_{name}"] for name in SHOT_GROUPS], axis=-1))
    return out


def _nanmean(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite values; NaN where there is none. [..., K] -> [...]."""
    finite = np.isfinite(x)
    count = finite.sum(axis=-1)
    total = np.where(finite, x, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _mean_percent(ap: np.ndarray) -> np.ndarray:
    return 100.0 * _nanmean(ap)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The (1 - confidence)/2 and (1 + confidence)/2 percentiles of the finite values; NaN if none."""
    x = values[np.isfinite(values)]
    if not x.size:
        return math.nan, math.nan
    low, high = np.percentile(x, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)


def verdict(diff: float, ci_low: float, ci_high: float, fold_diffs: Sequence[float]) -> str:
    """'holds' | 'mixed' | 'within noise' from the pooled diff and interval and the folds' diffs (module docstring)."""
    folds = np.asarray(fold_diffs, dtype=np.float64)
    if (folds > 0).any() and (folds < 0).any():
        return "mixed"
    excludes_zero = bool(ci_low > 0 or ci_high < 0)  # False when NaN
    agree = diff != 0 and bool(np.all(np.sign(folds) == np.sign(diff)))  # False for a NaN diff or fold
    return "holds" if excludes_zero and agree else "within noise"


def _check_fold(fold: int, reference: FoldScores, arm: FoldScores) -> None:
    if tuple(reference.image_ids) != tuple(arm.image_ids):
        raise ValueError(f"fold {fold}: the arms' test image_ids differ")
    if np.shape(reference.targets) != np.shape(arm.targets) or not np.array_equal(reference.targets, arm.targets):
        raise ValueError(f"fold {fold}: the arms' test targets differ")
    if len(reference.image_ids) != np.shape(reference.targets)[0]:
        raise ValueError(f"fold {fold}: {len(reference.image_ids)} image_ids for {np.shape(reference.targets)[0]} "
                         "target rows")


class Bootstrapper:
    """Resamples per fold (from `default_rng([seed, fold])`) and a cache of resampled metrics per score array.

    The cache holds each scored array (so its id stays unique) with its metrics; score arrays must not be mutated.
    """

    def __init__(self, resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE):
        self.resamples, self.seed, self.confidence = resamples, seed, confidence
        self._draws: dict[tuple[int, int], tuple[np.ndarray, dict[str, Any]]] = {}
        self._metrics: dict[tuple, tuple[Any, ...]] = {}

    def image_counts(self, fold: int, n_images: int) -> np.ndarray:
        """W_f [B, N] multinomial image counts of the fold (the first draws of its generator)."""
        return self._fold_draws(fold, n_images)[0]

    def seed_draws(self, fold: int, n_images: int, n_seeds: int) -> np.ndarray:
        """[B, S] seed indices drawn with replacement, from the fold's generator right after the image counts."""
        rng = np.random.default_rng()
        rng.bit_generator.state = self._fold_draws(fold, n_images)[1]
        return rng.integers(0, n_seeds, size=(self.resamples, n_seeds))

    def _fold_draws(self, fold: int, n_images: int) -> tuple[np.ndarray, dict[str, Any]]:
        key = (int(fold), int(n_images))
        if key not in self._draws:
            rng = np.random.default_rng([self.seed, int(fold)])
            counts = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=self.resamples)
            self._draws[key] = counts, rng.bit_generator.state
        return self._draws[key]

    def metrics(self, fold: int, data: FoldScores, seed: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """One seed of one arm on one fold: (whole-set metrics {metric: float}, resampled {metric: [B]})."""
        scores, counts = data.scores[seed], np.asarray(data.train_counts)
        key = (int(fold), id(scores), id(data.targets), counts.tobytes())
        if key not in self._metrics:
            whole = {k: float(v) for k, v in metric_values(average_precision(scores, data.targets), counts).items()}
            ap = weighted_ap(scores, data.targets, self.image_counts(fold, len(data.image_ids)))
            self._metrics[key] = (scores, data.targets, whole, metric_values(ap, counts))
        return self._metrics[key][2], self._metrics[key][3]

    def compare(self, reference: Mapping[int, FoldScores], arm: Mapping[int, FoldScores],
                metrics: Sequence[str] = METRICS) -> dict[str, PooledDiff]:
        """arm − reference per metric, per fold and pooled; see the module docstring."""
        folds = sorted(set(reference) & set(arm))
        per_fold = [self._fold(f, reference[f], arm[f], metrics) for f in folds]
        out = {}
        for m in metrics:
            diffs = [fold_diff[m] for fold_diff, _ in per_fold]
            stat = np.mean([boot[m] for _, boot in per_fold], axis=0) if per_fold else np.array([])
            diff = float(np.mean([d.diff for d in diffs])) if diffs else math.nan
            low, high = _percentiles(stat, self.confidence)
            out[m] = PooledDiff(m, diff, low, high, tuple(diffs), verdict(diff, low, high, [d.diff for d in diffs]))
        return out

    def _fold(self, fold: int, reference: FoldScores, arm: FoldScores,
              metrics: Sequence[str]) -> tuple[dict[str, FoldDiff], dict[str, np.ndarray]]:
        """Per metric: the FoldDiff and the bootstrap statistics Δ_f^b [B] of one fold."""
        _check_fold(fold, reference, arm)
        seeds = sorted(set(reference.scores) & set(arm.scores))
        n_images = len(reference.image_ids)
        ref = [self.metrics(fold, reference, s) for s in seeds]
        alt = [self.metrics(fold, arm, s) for s in seeds]
        draws = self.seed_draws(fold, n_images, len(seeds)) if seeds else None
        diffs, boots = {}, {}
        for m in metrics:
            whole_ref = {s: r[0][m] for s, r in zip(seeds, ref, strict=True)}
            whole_alt = {s: a[0][m] for s, a in zip(seeds, alt, strict=True)}
            d = np.array([a[1][m] - r[1][m] for r, a in zip(ref, alt, strict=True)])  # [S, B]
            boots[m] = _nanmean(np.take_along_axis(d.T, draws, axis=1)) if seeds else np.full(self.resamples, np.nan)
            point = _nanmean(np.array([whole_alt[s] - whole_ref[s] for s in seeds]))
            low, high = _percentiles(boots[m], self.confidence)
            t = paired(whole_ref, whole_alt, self.confidence)
            diffs[m] = FoldDiff(fold, len(seeds), n_images, float(point), low, high, t.ci_low, t.ci_high, t.p_value)
        return diffs, boots


def compare(reference: Mapping[int, FoldScores], arm: Mapping[int, FoldScores], *, resamples: int = RESAMPLES,
            seed: int = 0, confidence: float = CONFIDENCE, metrics: Sequence[str] = METRICS,
            bootstrapper: Bootstrapper | None = None) -> dict[str, PooledDiff]:
    """{fold: FoldScores} of the reference and of the arm -> {metric: PooledDiff} of arm − reference.

    Pass one `Bootstrapper` to compare many arms against one reference without recomputing it (its resamples,
    seed and confidence then replace the keyword arguments)."""
    boot = bootstrapper if bootstrapper is not None else Bootstrapper(resamples, seed, confidence)
    return boot.compare(reference, arm, metrics)
