"""Figures of a COMIC run: mAP curves, shot-group bars, RLC corrections (paper Fig. 5a), class distribution with
corrections (Fig. 5b) and per-class AP.

Pure functions over plain Python / numpy data, each returning a matplotlib `Figure` drawn on the Agg canvas. They
use no pyplot, so nothing is registered in a global figure manager (no leak in long loops, no display needed, the
user's backend choice is untouched). Save with `fig.savefig("x.png")` or `RunTracker.log_figure(fig, "x.png")`.
Shot groups are `comic.metrics.shot_groups`: many >= 100 training images, medium 20-99, few < 20. The figures of
studies and sweeps are in `comic.report.study_plots`; both share this module's figure helpers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from comic.metrics import shot_groups

SHOT_GROUPS = ("many", "medium", "few")
GROUP_COLORS = {"many": "#4C72B0", "medium": "#DD8452", "few": "#C44E52", "total": "#55A868"}
MODEL_COLORS = {"head": "#4C72B0", "tail": "#C44E52", "balanced": "#2F2F2F"}
RUN_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    for ax in axes:
        ax.grid(alpha=0.3, linewidth=0.6)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def _epochs(history: Sequence[Mapping[str, Any]]) -> list[float]:
    return [float(row.get("epoch", i + 1)) for i, row in enumerate(history)]


def _series(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray | None:
    """The values of `key` over the history (NaN where an epoch lacks it), or None if no epoch has it."""
    if not any(key in row for row in history):
        return None
    return np.array([float(row.get(key, math.nan)) for row in history])


def _class_axis(ax: Axes, names: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7 if len(names) > 30 else 8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.grid(axis="x", visible=False)


def _class_width(n_classes: int) -> float:
    return max(6.0, 0.2 * n_classes + 1.5)


# --------------------------------------------------------------------------------------------- over epochs


def _mark_best(ax: Axes, epochs: Sequence[float], values: np.ndarray) -> None:
    """A star on the best epoch (model selection is by the balanced model's val mAP)."""
    if np.all(np.isnan(values)):
        return
    best = int(np.nanargmax(values))
    label = f"best {values[best]:.3g} @ {epochs[best]:g}"
    ax.scatter([epochs[best]], [values[best]], s=90, marker="*", color="#E1A100", zorder=5, label=label)
    ax.legend(frameon=False)


def _first_series(history: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> np.ndarray | None:
    for key in keys:
        values = _series(history, key)
        if values is not None:
            return values
    return None


def plot_map_curves(history: Sequence[Mapping[str, Any]], prefix: str = "val", title: str | None = None) -> Figure:
    """mAP of the head / tail / balanced models over epochs; a second panel for many / medium / few if logged.

    `history` holds one flat metric dict per epoch: `'<prefix>/map'` is the balanced model, the head and tail models
    are `'<prefix>/head/map'` / `'<prefix>/tail/map'` (as the engine logs them; `'<prefix>/map_head'` / `_tail` also
    work), shot groups `'<prefix>/map_many'`, ...; an `'epoch'` key sets the x value. Missing keys are skipped.
    """
    epochs = _epochs(history)
    models = {
        "head": _first_series(history, (f"{prefix}/head/map", f"{prefix}/map_head")),
        "tail": _first_series(history, (f"{prefix}/tail/map", f"{prefix}/map_tail")),
        "balanced": _series(history, f"{prefix}/map"),
    }
    groups = {name: _series(history, f"{prefix}/map_{name}") for name in SHOT_GROUPS}
    panels = [p for p in (models, groups) if any(v is not None for v in p.values())]
    if not panels:
        raise ValueError(f"history has no '{prefix}/map*' metrics to plot")
    fig, axes = _figure(5.5 * len(panels), 4.0, ncols=len(panels))
    for ax, panel, heading in zip(axes, panels, ("models", "shot groups (balanced model)"), strict=False):
        colors = MODEL_COLORS if panel is models else GROUP_COLORS
        for name, values in panel.items():
            if values is not None:
                ax.plot(epochs, values, marker="o", markersize=3, linewidth=1.6, color=colors[name], label=name)
        ax.set(xlabel="epoch", ylabel="mAP", title=f"{prefix} mAP: {heading}")
        ax.legend(frameon=False)
    if models["balanced"] is not None:
        _mark_best(axes[0], epochs, models["balanced"])
    if title:
        fig.suptitle(title)
    return fig


def plot_corrections(
    history: Sequence[Mapping[str, Any]], tp_key: str = "rlc/tp", fp_key: str = "rlc/fp", title: str | None = None
) -> Figure:
    """RLC label corrections per epoch: true vs false positives (paper Fig. 5a); precision on a right axis if the
    history carries `'rlc/precision'`."""
    epochs = _epochs(history)
    tp, fp = _series(history, tp_key), _series(history, fp_key)
    if tp is None and fp is None:
        raise ValueError(f"history has neither {tp_key!r} nor {fp_key!r}")
    fig, (ax,) = _figure(6.0, 4.0)
    for values, label, color in ((tp, "true positives", "#55A868"), (fp, "false positives", "#C44E52")):
        if values is not None:
            ax.plot(epochs, values, marker="o", markersize=3, linewidth=1.8, color=color, label=label)
            ax.fill_between(epochs, 0, values, color=color, alpha=0.12)
    ax.set(xlabel="epoch", ylabel="corrected labels", title=title or "RLC corrections over training")
    ax.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    precision = _series(history, "rlc/precision")
    if precision is not None:
        twin = ax.twinx()
        twin.plot(epochs, precision, linestyle="--", linewidth=1.4, color="#4C72B0", label="precision")
        twin.set_ylabel("correction precision")
        twin.set_ylim(0, 1.05)
        twin.spines[["top"]].set_visible(False)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, frameon=False, loc="upper left")
    return fig


# --------------------------------------------------------------------------------------------- shot groups


_GROUP_KEYS = {"total": "map", **{g: f"map_{g}" for g in SHOT_GROUPS}}


def _detect_prefix(metrics: Mapping[str, Any]) -> str | None:
    """The prefix holding the most '<p>/map', '<p>/map_many', ... keys (shortest on a tie): 'test' in
    {'test/map': .., 'test/map_few': .., 'test/head/map': ..}; None for plain keys."""
    found: dict[str, int] = {}
    for key in metrics:
        head, sep, tail = key.rpartition("/")
        if sep and tail in _GROUP_KEYS.values():
            found[head] = found.get(head, 0) + 1
    return min(found, key=lambda p: (-found[p], len(p))) if found else None


def _group_value(metrics: Mapping[str, Any], group: str, prefix: str | None) -> float:
    candidates = (f"{prefix}/{_GROUP_KEYS[group]}",) if prefix else ()
    for candidate in (*candidates, group, _GROUP_KEYS[group]):
        if candidate in metrics:
            return float(metrics[candidate])
    return math.nan


def plot_shot_groups(
    metrics: Mapping[str, Any], title: str = "mAP per shot group", prefix: str | None = None
) -> Figure:
    """Bars of many / medium / few / total mAP. `metrics` is one flat metric dict or `{run label: flat dict}` to put
    runs side by side. Keys are `'<prefix>/map_many'`, ..., `'<prefix>/map'` (the prefix, e.g. 'val' or 'test', is
    found from the keys unless given) or plain `'many'`, ..., `'total'`."""
    nested = bool(metrics) and all(isinstance(v, Mapping) for v in metrics.values())
    runs: Mapping[str, Mapping[str, Any]] = metrics if nested else {"": metrics}
    groups = (*SHOT_GROUPS, "total")
    fig, (ax,) = _figure(4.5 + 0.8 * len(runs), 4.0)
    width = 0.8 / len(runs)
    x = np.arange(len(groups))
    for i, (label, run) in enumerate(runs.items()):
        run_prefix = prefix if prefix is not None else _detect_prefix(run)
        values = [_group_value(run, g, run_prefix) for g in groups]
        colors = [GROUP_COLORS[g] for g in groups] if len(runs) == 1 else RUN_COLORS[i % len(RUN_COLORS)]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, values, width * 0.95, color=colors, label=label or None)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.3g}" for v in values], padding=2, fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set(ylabel="mAP", title=title)
    ax.grid(axis="x", visible=False)
    ax.margins(y=0.12)
    if len(runs) > 1:
        ax.legend(frameon=False, ncols=min(4, len(runs)), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return fig


# --------------------------------------------------------------------------------------------- per class


def _shade_groups(ax: Axes, counts: np.ndarray) -> None:
    """Shade the contiguous many / medium / few ranges of classes sorted by descending count."""
    groups = shot_groups(counts)
    for group in SHOT_GROUPS:
        idx = np.flatnonzero(groups == group)
        if idx.size:
            ax.axvspan(idx[0] - 0.5, idx[-1] + 0.5, color=GROUP_COLORS[group], alpha=0.08, linewidth=0)
            ax.text(
                (idx[0] + idx[-1]) / 2,
                1.0,
                f"{group} ({idx.size})",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color=GROUP_COLORS[group],
            )


def plot_class_distribution(
    class_names: Sequence[str],
    observed_counts: Sequence[float],
    corrected_counts: Sequence[float],
    full_counts: Sequence[float] | None = None,
    title: str = "Training class distribution with RLC corrections",
) -> Figure:
    """Per-class positive counts, sorted by observed count (paper Fig. 5b): observed (partial) labels and the counts
    after correction side by side (behind each other they vanish on a log axis), optional full-label counts as
    markers; many / medium / few bands shaded."""
    observed = np.asarray(observed_counts, dtype=float)
    corrected = np.asarray(corrected_counts, dtype=float)
    if not len(class_names) == observed.size == corrected.size:
        raise ValueError("class_names, observed_counts and corrected_counts must have the same length")
    order = np.argsort(-observed, kind="stable")
    names = [class_names[i] for i in order]
    x = np.arange(len(names))
    fig, (ax,) = _figure(_class_width(len(names)), 4.5)
    _shade_groups(ax, observed[order])
    ax.bar(x - 0.2, observed[order], 0.4, color="#4C72B0", label="observed (partial labels)")
    ax.bar(x + 0.2, corrected[order], 0.4, color="#55A868", label="after correction")
    if full_counts is not None:
        full = np.asarray(full_counts, dtype=float)[order]
        ax.scatter(x, full, marker="_", s=80, linewidths=1.6, color="black", zorder=4, label="full labels")
    positive = observed[observed > 0]
    if positive.size and corrected.max() / positive.min() > 30:
        ax.set_yscale("log")  # long-tailed counts span orders of magnitude
    _class_axis(ax, names)
    ax.set_ylabel("positive labels")
    ax.set_title(title, pad=16)  # room for the shot-group labels above the axes
    ax.legend(frameon=False, loc="upper right")
    return fig


def plot_per_class_ap(
    class_names: Sequence[str],
    ap: Sequence[float],
    train_counts: Sequence[float],
    title: str = "Per-class AP",
) -> Figure:
    """Per-class AP bars (`ap` in [0, 1], drawn in % like every mAP here) sorted high to low, coloured by shot group
    (from training counts), with a dashed line at each group's mean AP. Classes whose AP is NaN (no positives in the
    evaluation set) are left out."""
    values = 100.0 * np.asarray(ap, dtype=float)
    counts = np.asarray(train_counts, dtype=float)
    if not len(class_names) == values.size == counts.size:
        raise ValueError("class_names, ap and train_counts must have the same length")
    keep = np.flatnonzero(~np.isnan(values))
    order = keep[np.argsort(-values[keep], kind="stable")]
    groups = list(shot_groups(counts[order]))
    fig, (ax,) = _figure(_class_width(len(order)), 4.5)
    ax.bar(np.arange(len(order)), values[order], 0.8, color=[GROUP_COLORS[g] for g in groups])
    handles = []
    for group in SHOT_GROUPS:
        members = values[order][np.array(groups) == group] if groups else np.array([])
        if members.size:
            mean = float(members.mean())
            ax.axhline(mean, color=GROUP_COLORS[group], linestyle="--", linewidth=1.0)
            handles.append(Patch(color=GROUP_COLORS[group], label=f"{group}: {members.size} classes, mAP {mean:.1f}"))
    _class_axis(ax, [class_names[i] for i in order])
    skipped = len(class_names) - len(order)
    ax.set_ylabel("AP (%)")
    if skipped:
        title += f" ({skipped} class{'es' if skipped > 1 else ''} without positives omitted)"
    ax.set_title(title)
    ax.legend(handles=handles, frameon=False, loc="upper right")
    return fig
