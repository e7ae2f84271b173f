"""The fold-stratified, seed-and-image paired bootstrap against independent references: `comic.metrics` on
materialised resamples, `scipy.stats.bootstrap`, `stats.paired`, and hand-built cases whose outcome is certain."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from comic.metrics import average_precision, evaluate_scores
from comic.report import bootstrap
from comic.report.bootstrap import (
    METRICS,
    Bootstrapper,
    FoldScores,
    compare,
    metric_values,
    verdict,
    weighted_ap,
)
from comic.report.stats import paired

COUNTS = np.array([500, 150, 50, 30, 5])  # shot groups: many, many, medium, medium, few
MINUS = "\u2212"


def _targets(rng: np.random.Generator, n: int, c: int = 5, rate: float = 0.3) -> np.ndarray:
    t = (rng.random((n, c)) < rate).astype(np.int64)
    t[:2] = 1  # every class has a positive on the whole set
    return t


def _fold(ids: range, targets: np.ndarray, scores: dict[int, np.ndarray], counts=COUNTS) -> FoldScores:
    return FoldScores(tuple(ids), targets, scores, counts)


def test_weighted_ap_all_ones_equals_average_precision_with_ties():
    rng = np.random.default_rng(0)
    n = 200
    scores = np.round(rng.random((n, 6)), 1)  # 11 distinct values: many ties
    targets = _targets(rng, n, 6)
    targets[:, 5] = 0  # no positive: NaN in both
    got = weighted_ap(scores, targets, np.ones((1, n), dtype=np.int64))[0]
    want = average_precision(scores, targets)
    assert np.isnan(got[5]) and np.isnan(want[5])
    np.testing.assert_allclose(got[:5], want[:5], rtol=0, atol=1e-12)


def test_weighted_ap_equals_average_precision_on_repeated_rows():
    rng = np.random.default_rng(1)
    n = 150
    scores, targets = rng.random((n, 5)), _targets(rng, n)
    targets[:, 4] = 0
    targets[[7, 9], 4] = 1  # class 4: two positives, both left out of resample 0
    weights = rng.integers(0, 4, size=(6, n))
    weights[3] = rng.multinomial(n, np.full(n, 1 / n))  # a bootstrap draw among them
    weights[0, [7, 9]] = 0
    got = weighted_ap(scores, targets, weights)
    assert got.shape == (6, 5)
    assert np.isnan(got[0, 4])
    for b in range(6):
        rows = np.repeat(np.arange(n), weights[b])
        np.testing.assert_allclose(got[b], average_precision(scores[rows], targets[rows]), rtol=0, atol=1e-12)


def test_metric_values_match_evaluate_scores():
    rng = np.random.default_rng(2)
    scores, targets = rng.random((80, 5)), _targets(rng, 80)
    for counts in (COUNTS, np.array([500, 150, 150, 300, 200])):  # the second has no medium / few group: NaN
        want = evaluate_scores(scores, targets, counts)
        got = metric_values(average_precision(scores, targets), counts)
        for m in METRICS:
            assert float(got[m]) == pytest.approx(want[m], rel=1e-12, nan_ok=True)
    # vectorised over leading axes, NaN APs excluded, a group without an evaluable class NaN
    ap = np.array([[0.5, 0.7, np.nan, 0.1, np.nan], [1.0, np.nan, 0.2, 0.4, 0.9]])
    got = metric_values(ap, COUNTS)
    np.testing.assert_allclose(got["map"], [100 * 1.3 / 3, 100 * 2.5 / 4])
    np.testing.assert_allclose(got["map_many"], [60.0, 100.0])
    np.testing.assert_allclose(got["map_medium"], [10.0, 30.0])
    assert math.isnan(got["map_few"][0]) and got["map_few"][1] == pytest.approx(90.0)
    np.testing.assert_allclose(got["map_avg"], [35.0, (100 + 30 + 90) / 3])


def test_single_fold_single_seed_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(3)
    n = 120
    targets = _targets(rng, n)
    ref_scores = rng.random((n, 5))
    arm_scores = rng.random((n, 5)) + 0.3 * targets  # better, by a margin comparable to the noise
    ref, arm = _fold(range(n), targets, {0: ref_scores}), _fold(range(n), targets, {0: arm_scores})
    out = compare({0: ref}, {0: arm}, resamples=2000, seed=5, metrics=("map",))["map"]

    def statistic(rows: np.ndarray) -> float:
        return (evaluate_scores(arm_scores[rows], targets[rows], COUNTS)["map"]
                - evaluate_scores(ref_scores[rows], targets[rows], COUNTS)["map"])

    whole = statistic(np.arange(n))
    assert out.diff == pytest.approx(whole, rel=1e-12) and out.folds[0].diff == pytest.approx(whole, rel=1e-12)
    ci = scipy_stats.bootstrap((np.arange(n),), statistic, n_resamples=2000, method="percentile", vectorized=False,
                               confidence_level=0.95, rng=np.random.default_rng(7)).confidence_interval
    # Two independent Monte Carlo estimates of the same 2.5 % / 97.5 % quantiles from 2000 resamples: each has a
    # standard error of about 0.06 sigma (sqrt(p(1-p)/B) / density), the difference about 0.09 sigma, while the
    # width is about 3.9 sigma; 0.15 x width is about 6 standard errors of the difference.
    width = ci.high - ci.low
    assert width > 1.0
    assert out.ci_low == pytest.approx(ci.low, abs=0.15 * width)
    assert out.ci_high == pytest.approx(ci.high, abs=0.15 * width)
    assert (out.folds[0].ci_low, out.folds[0].ci_high) == (out.ci_low, out.ci_high)  # one fold: pooled = fold
    assert out.folds[0].n_seeds == 1 and out.folds[0].n_images == n
    assert math.isnan(out.folds[0].t_low) and math.isnan(out.folds[0].t_high) and math.isnan(out.folds[0].p_value)


def _three_folds(arm_kind: tuple[str, str, str], n: int = 60, seeds: int = 2):
    """Reference: random scores; arm per fold: 'same' (copies), 'perfect' or 'inverted' rankings."""
    rng = np.random.default_rng(4)
    reference, arm = {}, {}
    for f, kind in enumerate(arm_kind):
        targets, ids = _targets(rng, n), range(100 * f, 100 * f + n)
        ref_scores = {s: rng.random((n, 5)) for s in range(seeds)}
        noise = {s: 0.5 * rng.random((n, 5)) for s in range(seeds)}
        arm_scores = {"same": {s: v.copy() for s, v in ref_scores.items()},
                      "perfect": {s: targets + noise[s] for s in range(seeds)},  # every positive above every negative
                      "inverted": {s: 1 - targets + noise[s] for s in range(seeds)}}[kind]
        reference[f], arm[f] = _fold(ids, targets, ref_scores), _fold(ids, targets.copy(), arm_scores)
    return reference, arm


def test_identical_arms_give_zero():
    reference, arm = _three_folds(("same", "same", "same"))
    for m, out in compare(reference, arm, resamples=300).items():
        assert (out.metric, out.diff, out.ci_low, out.ci_high) == (m, 0.0, 0.0, 0.0)
        assert out.verdict == "within noise" and out.signs == "0 0 0"
        assert all((f.diff, f.ci_low, f.ci_high) == (0.0, 0.0, 0.0) for f in out.folds)


def test_better_on_every_fold_holds_and_opposite_folds_are_mixed():
    reference, arm = _three_folds(("perfect", "perfect", "perfect"))
    out = compare(reference, arm, resamples=300)
    for m in METRICS:
        assert out[m].verdict == "holds" and out[m].signs == "+ + +"
        assert 0 < out[m].ci_low <= out[m].diff <= out[m].ci_high
    assert [f.fold for f in out["map"].folds] == [0, 1, 2]
    # perfect ranking: AP 1 for every class on every fold, so the diff is 100 minus the reference's mAP
    for f in out["map"].folds:
        fold = reference[f.fold]
        ref_maps = [evaluate_scores(s, fold.targets, COUNTS)["map"] for s in fold.scores.values()]
        assert f.diff == pytest.approx(100 - np.mean(ref_maps), rel=1e-12)

    reference, arm = _three_folds(("perfect", "perfect", "inverted"))
    out = compare(reference, arm, resamples=300)
    for m in METRICS:
        assert out[m].verdict == "mixed" and out[m].signs == f"+ + {MINUS}"
        assert out[m].folds[2].ci_high < 0 < out[m].folds[0].ci_low


def test_verdict_rule_by_hand():
    assert verdict(1.0, 0.5, 1.5, [1.0, 2.0]) == "holds"
    assert verdict(-1.0, -1.5, -0.5, [-1.0]) == "holds"  # one fold trivially agrees
    assert verdict(1.0, 0.5, 1.5, [2.0, 0.0]) == "within noise"  # a zero fold does not agree (strict signs)
    assert verdict(1.0, -0.1, 2.0, [1.0, 1.0]) == "within noise"  # interval contains 0
    assert verdict(1.0, 0.5, 1.5, [3.0, -1.0]) == "mixed"
    assert verdict(0.1, -1.0, 1.0, [3.0, -1.0]) == "mixed"
    assert verdict(math.nan, math.nan, math.nan, [1.0, math.nan]) == "within noise"


def test_seeds_are_paired_by_key_and_t_test_is_stats_paired():
    rng = np.random.default_rng(6)
    n, seeds = 80, [3, 11, 17, 29]
    targets = _targets(rng, n)
    ref_scores = {s: rng.random((n, 5)) + rng.random() * targets for s in seeds}  # seeds differ in quality
    arm_scores = {s: rng.random((n, 5)) + 0.2 * targets for s in seeds}
    ref, arm = _fold(range(n), targets, ref_scores), _fold(range(n), targets, arm_scores)
    out = compare({0: ref}, {0: arm}, resamples=300)
    for m in ("map", "map_many", "map_avg"):
        per_ref = {s: evaluate_scores(ref_scores[s], targets, COUNTS)[m] for s in seeds}
        per_arm = {s: evaluate_scores(arm_scores[s], targets, COUNTS)[m] for s in seeds}
        want, fold = paired(per_ref, per_arm), out[m].folds[0]
        assert fold.n_seeds == want.n == 4
        assert fold.diff == pytest.approx(want.diff, rel=1e-12)
        assert (fold.t_low, fold.t_high, fold.p_value) == pytest.approx((want.ci_low, want.ci_high, want.p_value))

    # The same scores under the same seed keys in both arms: the paired difference is exactly 0 on every resample;
    # the reference's seeds under rotated keys: the same whole-set mean, but seed noise no longer cancels.
    same = compare({0: ref}, {0: _fold(range(n), targets, dict(ref_scores))}, resamples=300)["map"]
    assert (same.diff, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
    rotated = dict(zip(seeds, [ref_scores[s] for s in seeds[1:] + seeds[:1]], strict=True))
    unpaired = compare({0: ref}, {0: _fold(range(n), targets, rotated)}, resamples=300)["map"]
    assert unpaired.diff == pytest.approx(0.0, abs=1e-9)
    assert unpaired.ci_high - unpaired.ci_low > 1.0


def test_folds_and_seeds_in_both_arms_only_and_resamples_shared():
    rng = np.random.default_rng(8)
    n = 50
    t0, t1 = _targets(rng, n), _targets(rng, n)
    reference = {0: _fold(range(n), t0, {0: rng.random((n, 5)), 1: rng.random((n, 5)), 2: rng.random((n, 5))}),
                 1: _fold(range(n), t1, {0: rng.random((n, 5))})}
    arm = {0: _fold(range(n), t0, {1: rng.random((n, 5)), 2: rng.random((n, 5)), 5: rng.random((n, 5))}),
           2: _fold(range(n), t1, {0: rng.random((n, 5))})}
    out = compare(reference, arm, resamples=100, seed=3)["map"]
    assert [(f.fold, f.n_seeds) for f in out.folds] == [(0, 2)]
    # the documented draws: W_f ~ Multinomial(N, uniform) from default_rng([seed, f]), then the seed indices
    rng_f = np.random.default_rng([3, 0])
    counts = rng_f.multinomial(n, np.full(n, 1 / n), size=100)
    boot = Bootstrapper(resamples=100, seed=3)
    np.testing.assert_array_equal(boot.image_counts(0, n), counts)
    np.testing.assert_array_equal(boot.seed_draws(0, n, 2), rng_f.integers(0, 2, size=(100, 2)))
    assert compare(reference, arm, resamples=100, seed=3)["map"] == out  # reproducible


def test_one_bootstrapper_computes_the_reference_once(monkeypatch):
    reference, arm = _three_folds(("perfect", "same", "inverted"), n=40)
    calls = []
    real = bootstrap.weighted_ap
    monkeypatch.setattr(bootstrap, "weighted_ap", lambda *a: calls.append(1) or real(*a))
    boot = Bootstrapper(resamples=50)
    first = boot.compare(reference, arm)
    assert len(calls) == 12  # 3 folds x 2 seeds x 2 arms
    second = boot.compare(reference, _three_folds(("same", "same", "same"), n=40)[1])
    assert len(calls) == 18  # only the new arm's 6 arrays
    assert first["map"] == compare(reference, arm, resamples=50)["map"]
    assert second["map"].verdict == "within noise"


def test_mismatched_images_raise_naming_the_fold():
    rng = np.random.default_rng(9)
    n = 30
    targets = _targets(rng, n)
    ref = {3: _fold(range(n), targets, {0: rng.random((n, 5))})}
    with pytest.raises(ValueError, match="fold 3.*image_ids"):
        compare(ref, {3: _fold(range(1, n + 1), targets, {0: rng.random((n, 5))})}, resamples=10)
    other = targets.copy()
    other[0, 0] = 1 - other[0, 0]
    with pytest.raises(ValueError, match="fold 3.*targets"):
        compare(ref, {3: _fold(range(n), other, {0: rng.random((n, 5))})}, resamples=10)
