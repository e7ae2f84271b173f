"""Figures of ablation studies and sweeps: arm bars with confidence intervals (Fig. 4a), sensitivity curves
(Fig. 3), per-epoch curves of the three models (Fig. 6), a sweep's optimization history and parallel coordinates.

Pure functions returning Agg-canvas `Figure`s, like `comic.report.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import cm, colormaps, colors
from matplotlib.figure import Figure

from comic.report.plots import GROUP_COLORS, MODEL_COLORS, RUN_COLORS, _figure

Interval = tuple[float, float, float]  # (mean, low, high)


def _yerr(points: Sequence[Interval]) -> np.ndarray:
    """[2, N] distances below / above each mean for errorbar(); NaN bounds draw no bar."""
    arr = np.array(points, dtype=float).reshape(-1, 3)
    return np.nan_to_num(np.abs(np.stack([arr[:, 0] - arr[:, 1], arr[:, 2] - arr[:, 0]])), nan=0.0)


def plot_arm_bars(values: Mapping[str, Mapping[str, Interval]], title: str,
                  error_label: str = "95% CI over seeds") -> Figure:
    """Grouped bars, one group per metric and one bar per arm, with error bars (paper Fig. 4a).

    values: {arm: {metric: (mean, low, high)}}; arms and metrics are drawn in the mapping's order.
    """
    arms = list(values)
    metrics = list(dict.fromkeys(m for per_arm in values.values() for m in per_arm))
    fig, (ax,) = _figure(3.0 + 1.1 * len(arms) * len(metrics) / 2, 4.0)
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(metrics))
    for i, arm in enumerate(arms):
        arm_points = [values[arm].get(m, (math.nan,) * 3) for m in metrics]
        means = [p[0] for p in arm_points]
        bars = ax.bar(x + (i - (len(arms) - 1) / 2) * width, means, width * 0.92, yerr=_yerr(arm_points),
                      capsize=3, color=RUN_COLORS[i % len(RUN_COLORS)], label=arm)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.3g}" for v in means], padding=2, fontsize=7)
    drawn = [p for per_arm in values.values() for p in per_arm.values() if not math.isnan(p[0])]
    if drawn:  # zoom on the bars' range: ablation differences are a few mAP points
        low = min(p[0] if math.isnan(p[1]) else p[1] for p in drawn)
        high = max(p[0] if math.isnan(p[2]) else p[2] for p in drawn)
        span = max(high - low, 1.0)
        ax.set_ylim(max(0.0, low - 0.6 * span), high + 0.4 * span)
    ax.set_xticks(x)
    ax.set_xticklabels(metrics)
    ax.set(ylabel="mAP (%)", title=title)
    ax.grid(axis="x", visible=False)
    ax.legend(frameon=False, ncols=min(4, len(arms)), loc="upper center", bbox_to_anchor=(0.5, -0.1),
              title=f"error bars: {error_label}", title_fontsize=8)
    return fig


def plot_sensitivity(panels: Mapping[str, Mapping[str, Sequence[tuple[float, float, float, float]]]], title: str,
                     error_label: str = "95% CI over seeds") -> Figure:
    """One panel per swept hyperparameter (paper Fig. 3): a line per metric over the swept values, error bars.

    panels: {x-axis label: {metric: [(x, mean, low, high), ...]}}.
    """
    fig, axes = _figure(5.0 * len(panels), 4.0, ncols=len(panels))
    colors = list(GROUP_COLORS.values())
    for ax, (xlabel, lines) in zip(axes, panels.items(), strict=True):
        for i, (metric, points) in enumerate(lines.items()):
            pts = sorted(points)
            xs = [p[0] for p in pts]
            ax.errorbar(xs, [p[1] for p in pts], yerr=_yerr([p[1:] for p in pts]), marker="o", markersize=4,
                        capsize=3, linewidth=1.5, color=colors[i % len(colors)], label=metric)
        ax.set(xlabel=xlabel, ylabel="mAP (%)")
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle(f"{title} (error bars: {error_label})")
    return fig


def plot_training_curves(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]],
                         title: str, ylabel: str = "test mAP (%)") -> Figure:
    """Mean curves over seeds with a ± std band, one panel per training regime (paper Fig. 6a/b).

    panels: {panel title: {model ('head' / 'balanced' / 'tail' or any label): (epochs, mean, std)}}.
    """
    fig, axes = _figure(5.0 * len(panels), 4.0, ncols=len(panels))
    for ax, (heading, lines) in zip(axes, panels.items(), strict=True):
        for i, (model, (epochs, mean, std)) in enumerate(lines.items()):
            color = MODEL_COLORS.get(model, RUN_COLORS[i % len(RUN_COLORS)])
            mean_arr, std_arr = np.asarray(mean, dtype=float), np.nan_to_num(np.asarray(std, dtype=float))
            ax.plot(epochs, mean_arr, marker="o", markersize=3, linewidth=1.6, color=color, label=f"{model} model")
            ax.fill_between(epochs, mean_arr - std_arr, mean_arr + std_arr, color=color, alpha=0.15, linewidth=0)
        ax.set(xlabel="epoch", ylabel=ylabel, title=heading)
        ax.legend(frameon=False)
    if len(axes) > 1:  # same y range so the panels compare at a glance
        low = min(ax.get_ylim()[0] for ax in axes)
        high = max(ax.get_ylim()[1] for ax in axes)
        for ax in axes:
            ax.set_ylim(low, high)
    fig.suptitle(f"{title} (band: ± std over seeds)")
    return fig


# --------------------------------------------------------------------------------------------- sweeps


STATE_COLORS = {"completed": "#4C72B0", "early-stopped": "#DD8452", "errored": "#C44E52", "interrupted": "#8C8C8C"}


def plot_optimization_history(
    values: Sequence[float], states: Sequence[str] | None = None, metric: str = "val/map", title: str | None = None
) -> Figure:
    """A sweep's trials in the order they were created: each trial's score (coloured by how it ended) and the best
    score so far as a step line. Trials without a score (errored before their first epoch) are left out."""
    scores = np.asarray(values, dtype=float)
    states = list(states) if states is not None else ["completed"] * scores.size
    if len(states) != scores.size:
        raise ValueError("values and states must have the same length")
    order = np.arange(1, scores.size + 1)
    fig, (ax,) = _figure(6.5, 4.0)
    for state in dict.fromkeys(states):
        mask = np.array([s == state for s in states]) & ~np.isnan(scores)
        if mask.any():
            ax.scatter(order[mask], scores[mask], s=28, color=STATE_COLORS.get(state, "#8C8C8C"), label=state, zorder=3)
    if not np.all(np.isnan(scores)):
        running = np.fmax.accumulate(np.where(np.isnan(scores), -np.inf, scores))
        shown = np.isfinite(running)
        ax.step(order[shown], running[shown], where="post", color="#2F2F2F", linewidth=1.4, label="best so far")
    ax.set(xlabel="trial (creation order)", ylabel=f"{metric} (each trial's best epoch)",
           title=title or f"Optimization history ({metric})")
    ax.legend(frameon=False)
    return fig


def _axis_positions(values: np.ndarray, log: bool) -> tuple[np.ndarray, float, float]:
    """Values scaled to [0, 1] between their min and max (log scale if asked); a constant axis sits at 0.5."""
    shown = np.log10(values) if log else values
    lo, hi = float(np.nanmin(shown)), float(np.nanmax(shown))
    scaled = (shown - lo) / (hi - lo) if hi > lo else np.full_like(shown, 0.5)
    return scaled, float(np.nanmin(values)), float(np.nanmax(values))


def _parallel_columns(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str], log_params: Sequence[str]
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """[rows, axes] positions in [0, 1] and each axis's (bottom, top) label; text values map to sorted levels."""
    columns, labels = [], []
    for name in names:
        raw = [r.get(name) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
            scaled, lo, hi = _axis_positions(np.asarray(raw, dtype=float), name in log_params)
            labels.append((f"{lo:.3g}", f"{hi:.3g}"))
        else:
            levels = sorted({str(v) for v in raw})
            scaled = np.array([levels.index(str(v)) / max(len(levels) - 1, 1) for v in raw])
            labels.append((levels[0], levels[-1]))
        columns.append(scaled)
    return np.stack(columns, axis=1), labels


def plot_parallel_coordinates(
    rows: Sequence[Mapping[str, Any]],
    params: Sequence[str],
    metric: str = "val/map",
    log_params: Sequence[str] = (),
    title: str | None = None,
) -> Figure:
    """Parallel coordinates of a sweep: one vertical axis per searched parameter plus the metric, one line per trial
    coloured by its metric (darker = worse). Each axis spans its own min..max (labelled at both ends); parameters in
    `log_params` use a log scale. Non-numeric parameters are mapped to their sorted distinct values."""

    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and not math.isnan(float(r[metric]))]
    if not scored:
        raise ValueError(f"no row has a numeric {metric!r} to plot")
    axes_names = [*params, metric]
    data, labels = _parallel_columns(scored, axes_names, log_params)
    fig, (ax,) = _figure(max(6.0, 1.6 * len(axes_names) + 1.5), 4.2)
    color_values = np.asarray([float(r[metric]) for r in scored])
    norm = colors.Normalize(vmin=color_values.min(), vmax=color_values.max())
    cmap = colormaps["viridis"]
    x = np.arange(len(axes_names))
    for i in np.argsort(color_values):  # best trials drawn last, on top
        ax.plot(x, data[i], color=cmap(norm(color_values[i])), linewidth=1.5, alpha=0.85)
    for xi, (lo, hi) in zip(x, labels, strict=True):
        ax.axvline(xi, color="#2F2F2F", linewidth=0.8)
        ax.text(xi, -0.04, lo, ha="center", va="top", fontsize=7)
        ax.text(xi, 1.04, hi, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{n}\n(log)" if n in log_params else n for n in axes_names], fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.12, 1.12)
    ax.grid(False)
    ax.spines[["left", "bottom"]].set_visible(False)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric, shrink=0.85)
    ax.set_title(title or f"Searched parameters vs {metric} ({len(scored)} trials)", pad=14)
    return fig
