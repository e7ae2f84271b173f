"""comic.report.plots: each figure of a run has the expected axes / bars / lines for small inputs and saves as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from comic.report import plots, study_plots

NAMES = ["person", "car", "dog", "tie", "toaster", "kite"]
OBSERVED = [1240, 150, 60, 25, 8, 12]


def _bars(ax) -> list[int]:
    return [len(c) for c in ax.containers if isinstance(c, BarContainer)]


def _history(epochs: int, keys: tuple[str, ...]) -> list[dict[str, float]]:
    return [{"epoch": e, **{k: 0.1 * e + 0.01 * i for i, k in enumerate(keys)}} for e in range(1, epochs + 1)]


def _saves(fig: Figure, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_map_curves(tmp_path: Path) -> None:
    models_only = plots.plot_map_curves(_history(4, ("val/map", "val/map_head")))
    assert len(models_only.axes) == 1 and len(models_only.axes[0].get_lines()) == 2
    keys = ("val/map", "val/head/map", "val/tail/map", "val/map_many", "val/map_medium", "val/map_few")
    history = _history(5, keys)
    del history[2]["val/tail/map"]  # an epoch without a key leaves a gap, not an error
    fig = plots.plot_map_curves(history, title="synthetic")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert [len(ax.get_lines()) for ax in fig.axes] == [3, 3]
    assert fig.axes[0].get_lines()[0].get_xdata().tolist() == [1, 2, 3, 4, 5]
    _saves(fig, tmp_path, "curves")
    with pytest.raises(ValueError, match="val/map"):
        plots.plot_map_curves([{"train/loss": 1.0}])


def test_shot_groups(tmp_path: Path) -> None:
    one = plots.plot_shot_groups({"val/map_many": 0.6, "val/map_medium": 0.5, "val/map_few": 0.4, "val/map": 0.52})
    assert _bars(one.axes[0]) == [4]
    heights = [bar.get_height() for bar in one.axes[0].containers[0]]
    assert heights == pytest.approx([0.6, 0.5, 0.4, 0.52])
    # the prefix is found from the keys; the head model's 'test/head/map' is not the total
    split = {"test/map": 0.5, "test/map_many": 0.6, "test/map_few": 0.3, "test/head/map": 0.9, "test/map_avg": 0.4}
    heights = [bar.get_height() for bar in plots.plot_shot_groups(split).axes[0].containers[0]]
    assert heights == pytest.approx([0.6, math.nan, 0.3, 0.5], nan_ok=True)
    runs = {"COMIC": {"many": 0.6, "medium": 0.5, "few": 0.45, "total": 0.53}, "BCE": {"many": 0.58, "few": 0.3}}
    fig = plots.plot_shot_groups(runs, title="COMIC vs BCE")
    assert _bars(fig.axes[0]) == [4, 4]
    assert math.isnan(fig.axes[0].containers[1][1].get_height())  # BCE has no medium value
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["COMIC", "BCE"]
    _saves(fig, tmp_path, "shots")


def test_corrections(tmp_path: Path) -> None:
    history = [{"epoch": e, "rlc/tp": 100 * e, "rlc/fp": 10 * e} for e in range(1, 6)]
    fig = plots.plot_corrections(history)
    assert len(fig.axes) == 1 and len(fig.axes[0].get_lines()) == 2
    for row in history:
        row["rlc/precision"] = 0.9
    with_precision = plots.plot_corrections(history)
    assert len(with_precision.axes) == 2 and len(with_precision.axes[1].get_lines()) == 1
    _saves(with_precision, tmp_path, "corrections")
    with pytest.raises(ValueError, match="rlc/tp"):
        plots.plot_corrections([{"val/map": 0.3}])


def test_class_distribution(tmp_path: Path) -> None:
    corrected = [c + 5 for c in OBSERVED]
    full = [c + 10 for c in OBSERVED]
    fig = plots.plot_class_distribution(NAMES, OBSERVED, corrected, full)
    ax = fig.axes[0]
    assert _bars(ax) == [6, 6]
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["person", "car", "dog", "tie", "kite", "toaster"]
    assert [t.get_text() for t in ax.texts] == ["many (2)", "medium (2)", "few (2)"]
    assert len(ax.collections) == 1  # the full-label markers
    _saves(fig, tmp_path, "distribution")
    with pytest.raises(ValueError, match="same length"):
        plots.plot_class_distribution(NAMES, OBSERVED, corrected[:-1])


def test_per_class_ap(tmp_path: Path) -> None:
    ap = np.array([0.9, 0.7, 0.5, 0.6, math.nan, 0.2])
    fig = plots.plot_per_class_ap(NAMES, ap, OBSERVED)
    ax = fig.axes[0]
    assert _bars(ax) == [5]  # the NaN class is left out
    assert [t.get_text() for t in ax.get_xticklabels()] == ["person", "car", "tie", "dog", "kite"]
    assert len(ax.get_lines()) == 3  # one mean line per shot group
    assert [round(b.get_height(), 6) for b in ax.patches] == [90.0, 70.0, 60.0, 50.0, 20.0]  # in %, high to low
    assert ax.get_ylabel() == "AP (%)"
    assert "1 class without positives" in ax.get_title()
    _saves(fig, tmp_path, "per_class_ap")


def test_sweep_plots() -> None:
    rows = [{"a": 1.0, "b": "x", "val/map": 30.0}, {"a": 10.0, "b": "y", "val/map": 20.0},
            {"a": 3.0, "b": "x", "val/map": math.nan}]
    fig = study_plots.plot_parallel_coordinates(rows, ["a", "b"], log_params=["a"])
    assert len(fig.axes) == 2  # the lines and the colour bar
    history = study_plots.plot_optimization_history([30.0, math.nan, 35.0], ["completed", "errored", "early-stopped"])
    assert history.axes[0].get_ylabel().startswith("val/map")
    with pytest.raises(ValueError, match="numeric"):
        study_plots.plot_parallel_coordinates(rows[2:], ["a"])
