"""Figure builders for `AblationSpec.figure`: each returns a function of the study's `Outcome` that draws the
paper's figure with `comic.report.study_plots` (Fig. 3 sensitivity curves, Fig. 4a bars, Fig. 6 curves over epochs).
Error bars are 95% t confidence intervals of the mean over seeds; bands over epochs are ± one std.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
from matplotlib.figure import Figure

from comic.report import study_plots
from comic.studies.spec import FigureFn, Outcome


def _interval(stats: pd.DataFrame, arm: str, metric: str) -> tuple[float, float, float]:
    hit = stats[(stats["arm"] == arm) & (stats["metric"] == metric)]
    if not len(hit):
        return (math.nan, math.nan, math.nan)
    r = hit.iloc[0]
    return (float(r["mean"]), float(r["ci_low"]), float(r["ci_high"]))


def bars_figure(title: str, metrics: Sequence[str]) -> FigureFn:
    """Grouped bars of `metrics` per arm, 95% CI error bars (Fig. 4a)."""

    def make(outcome: Outcome) -> Figure:
        values = {arm: {m: _interval(outcome.stats, arm, m) for m in metrics} for arm in outcome.arms}
        return study_plots.plot_arm_bars(values, title)

    return make


def sensitivity_figure(title: str, panels: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> FigureFn:
    """One panel per swept value: `panels` = {x label: {arm: x}}; a line per metric, 95% CI error bars (Fig. 3)."""

    def make(outcome: Outcome) -> Figure:
        data = {label: {m: [(x, *_interval(outcome.stats, arm, m)) for arm, x in arms.items()
                            if arm in outcome.arms] for m in metrics} for label, arms in panels.items()}
        return study_plots.plot_sensitivity(data, title)

    return make


def curves_figure(title: str, panels: Mapping[str, str], models: Mapping[str, str]) -> FigureFn:
    """Per-epoch mean ± std over seeds: `panels` = {panel title: arm}, `models` = {model: curve metric} (Fig. 6)."""

    def make(outcome: Outcome) -> Figure:
        data = {}
        for heading, arm in panels.items():
            data[heading] = {}
            for model, key in models.items():
                sub = outcome.curves[(outcome.curves["arm"] == arm) & (outcome.curves["metric"] == key)]
                grouped = sub.groupby("epoch")["value"]
                data[heading][model] = (list(grouped.mean().index), list(grouped.mean()), list(grouped.std()))
        return study_plots.plot_training_curves(data, title)

    return make
