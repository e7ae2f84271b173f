"""Seed statistics against hand-computed values (and scipy as a second opinion), and the table renderings."""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
from scipy import stats as scipy_stats

from comic.report import tables
from comic.report.stats import aggregate, aggregate_gap, compare_arms, gap_closed, paired, summarize, t_quantile

# Student t, two-sided 95 %, 2 degrees of freedom, from a printed t table.
T_975_DF2 = 4.303
REFERENCE = {0: 50.0, 1: 52.0, 2: 54.0}
ARM = {0: 51.0, 1: 54.0, 2: 55.0}


def test_summary_by_hand():
    s = summarize(list(ARM.values()))
    # mean 160/3; squared deviations (7/3)^2 + (2/3)^2 + (5/3)^2 = 78/9, / (n-1) = 13/3.
    mean, std = 160 / 3, math.sqrt(13 / 3)
    assert s.n == 3
    assert s.mean == pytest.approx(53.3333, abs=1e-4) and s.mean == pytest.approx(mean)
    assert s.std == pytest.approx(2.0817, abs=1e-4) and s.std == pytest.approx(std)
    half = T_975_DF2 * std / math.sqrt(3)  # = 5.171
    assert s.ci_low == pytest.approx(mean - half, abs=2e-3) and s.ci_high == pytest.approx(mean + half, abs=2e-3)
    assert (s.ci_low, s.ci_high) == pytest.approx((48.162, 58.504), abs=2e-3)
    # scipy: the same interval from its t distribution
    low, high = scipy_stats.t.interval(0.95, 2, loc=mean, scale=std / math.sqrt(3))
    assert (s.ci_low, s.ci_high) == pytest.approx((low, high), rel=1e-12)
    assert t_quantile(2) == pytest.approx(T_975_DF2, abs=5e-4)


def test_gap_closed_by_hand():
    floor, ceiling = {0: 60.0, 1: 62.0, 2: 61.0}, {0: 70.0, 1: 70.0, 2: 71.0}
    arm = {0: 65.0, 1: 72.0, 2: 61.0, 3: 99.0}  # seed 3 has no floor: left out
    gaps = gap_closed({"floor": floor, "ceiling": ceiling, "arm": arm}, "floor", "ceiling")
    # (65-60)/(70-60) = 50 %; (72-62)/(70-62) = 125 % (beyond the ceiling); (61-61)/(71-61) = 0 %
    assert gaps["arm"] == pytest.approx({0: 50.0, 1: 125.0, 2: 0.0})
    assert gaps["floor"] == pytest.approx({0: 0.0, 1: 0.0, 2: 0.0})
    assert gaps["ceiling"] == pytest.approx({0: 100.0, 1: 100.0, 2: 100.0})
    rows = pd.DataFrame([{"arm": a, "seed": s, "state": "finished", "m": v}
                         for a, d in (("floor", floor), ("ceiling", ceiling), ("arm", arm)) for s, v in d.items()])
    frame = aggregate_gap(rows, {"total": "m"}, "floor", "ceiling", ["floor", "arm", "ceiling"])
    got = frame.set_index("arm").loc["arm"]
    assert got["n"] == 3 and got["mean"] == pytest.approx(175 / 3)
    assert got["std"] == pytest.approx(math.sqrt(((50 - 175 / 3) ** 2 + (125 - 175 / 3) ** 2 + (175 / 3) ** 2) / 2))


def test_paired_difference_within_noise_by_hand():
    p = paired(REFERENCE, ARM)
    # d = (1, 2, 1): mean 4/3, sd sqrt(1/3), se 1/3, t = 4 with 2 df.
    assert p.n == 3 and p.diff == pytest.approx(4 / 3) and p.diff_std == pytest.approx(math.sqrt(1 / 3))
    # Closed form of the t CDF for 2 df: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2).
    assert p.p_value == pytest.approx(1 - 4 / math.sqrt(18), abs=1e-9)  # 0.05719
    assert (p.ci_low, p.ci_high) == pytest.approx((4 / 3 - T_975_DF2 / 3, 4 / 3 + T_975_DF2 / 3), abs=2e-4)
    assert p.within_noise is True  # the interval [-0.10, 2.77] contains 0; p = 0.057 >= 0.05
    assert p.p_value == pytest.approx(scipy_stats.ttest_rel(list(ARM.values()), list(REFERENCE.values())).pvalue)


def test_paired_difference_that_is_real():
    arm = {0: 52.0, 1: 55.0, 2: 56.5}  # d = (2, 3, 2.5): mean 2.5, sd 0.5, t = 2.5 / (0.5 / sqrt 3) = 8.660
    p = paired(REFERENCE, arm)
    t = 2.5 / (0.5 / math.sqrt(3))
    assert p.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)  # 0.01307
    assert (p.ci_low, p.ci_high) == pytest.approx((2.5 - T_975_DF2 * 0.5 / math.sqrt(3),
                                                   2.5 + T_975_DF2 * 0.5 / math.sqrt(3)), abs=2e-4)
    assert p.within_noise is False


def test_pairs_only_common_finite_seeds_and_degenerate_cases():
    p = paired({0: 1.0, 1: 2.0, 2: math.nan, 3: 4.0}, {0: 2.0, 1: 4.0, 2: 5.0, 5: 1.0})
    assert p.n == 2 and p.diff == pytest.approx(1.5)  # seeds 0 and 1 only
    one = paired({0: 1.0}, {0: 2.0, 1: 3.0})
    assert one.n == 1 and one.within_noise is None and math.isnan(one.p_value)
    same = paired(REFERENCE, REFERENCE)
    assert same.p_value == 1.0 and same.within_noise is True and same.ci_low == same.ci_high == 0
    shifted = paired(REFERENCE, {k: v + 1 for k, v in REFERENCE.items()})
    assert shifted.p_value == 0.0 and shifted.within_noise is False and shifted.diff == pytest.approx(1.0)
    rounded = {0: 50.3, 1: 51.7, 2: 66.66}  # + 1.1 differs from 1.1 in the last bits, differently per seed
    assert len({rounded[k] + 1.1 - rounded[k] for k in rounded}) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy warns of catastrophic cancellation on such differences
        almost = paired(rounded, {k: v + 1.1 for k, v in rounded.items()})
    assert almost.p_value == 0.0 and almost.ci_low == almost.ci_high == pytest.approx(1.1)
    single = summarize([3.0, math.nan])
    assert single.n == 1 and single.mean == 3.0 and math.isnan(single.std) and math.isnan(single.ci_low)
    assert summarize([]).n == 0


def test_compare_and_aggregate_use_finished_rows_only():
    rows = pd.DataFrame([
        *({"arm": "ref", "seed": s, "state": "finished", "m": v} for s, v in REFERENCE.items()),
        *({"arm": "arm", "seed": s, "state": "finished", "m": v} for s, v in ARM.items()),
        {"arm": "arm", "seed": 3, "state": "failed", "m": 99.0},
    ])
    refs = {"ref": None, "arm": "ref"}
    out = aggregate(rows, {"score": "m", "absent": "nope"}, refs, ["ref", "arm"])
    assert list(zip(out["metric"], out["arm"], strict=True)) == [("score", "ref"), ("score", "arm"),
                                                                 ("absent", "ref"), ("absent", "arm")]
    arm = out[(out["metric"] == "score") & (out["arm"] == "arm")].iloc[0]
    assert arm["n"] == 3 and arm["mean"] == pytest.approx(160 / 3) and arm["reference"] == "ref"
    assert arm["p_value"] == pytest.approx(1 - 4 / math.sqrt(18))
    ref = out[(out["metric"] == "score") & (out["arm"] == "ref")].iloc[0]
    assert ref["n_pairs"] == 0 and ref["within_noise"] is None
    assert out[out["metric"] == "absent"]["n"].tolist() == [0, 0]
    assert compare_arms({"a": {0: 1.0}}, {"a": None})[0]["reference"] is None


def test_table_renderings():
    rows = pd.DataFrame([{"arm": a, "seed": s, "state": "finished", "m": v}
                         for a, vals in (("ref", REFERENCE), ("arm", ARM)) for s, v in vals.items()])
    stats = aggregate(rows, {"total": "m"}, {"ref": None, "arm": "ref"}, ["ref", "arm"])
    ours = tables.ours_table(stats, ["ref", "arm"], ["total"])
    assert ours["total"].tolist() == ["52.00 ± 2.00 (3)", "53.33 ± 2.08 (3)"]
    diffs = tables.differences_table(stats, ["ref", "arm"], ["total"])
    assert diffs["verdict"].tolist() == ["reference", "within noise"]
    assert diffs["diff [95% CI]"].tolist()[1] == "+1.33 [-0.10, +2.77]"
    md = tables.markdown(ours)
    assert md.splitlines()[0] == "| arm | total |" and md.splitlines()[2] == "| ref | 52.00 ± 2.00 (3) |"
    tex = tables.latex(ours, "Table 2: 100% of α", "tab:x")
    assert r"52.00 $\pm$ 2.00 (3) \\" in tex and r"100\% of $\alpha$" in tex and r"\toprule" in tex
    assert tables.mean_std(1.0, math.nan, 1) == "1.00 (1)" and tables.mean_std(math.nan, math.nan, 0) == "-"
