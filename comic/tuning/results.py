"""What a sweep reports: one row per trial from Tune's results, the best trial (Tune's `get_best_result` on the
best-on-val score every trial reports), the parent run's tables and plots, and the confirmation summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from ray import tune

from comic.config import Config, to_dict
from comic.report import study_plots, tables
from comic.tracking.client import RunTracker
from comic.tuning.runner import METRIC, MODE
from comic.tuning.space import Dimension
from comic.tuning.trial import RUN_ID_KEY, trial_label

BEST_METRIC = f"best/{METRIC}"  # the trial's best epoch so far by val/map, reported every epoch
CONFIRM_METRICS = ("best/val/map", "best/test/map", "best/test/map_many", "best/test/map_medium", "best/test/map_few")
STATES = ("completed", "early-stopped", "errored")


def trial_rows(grid: tune.ResultGrid, space: Mapping[str, Any], planned_epochs: int) -> list[dict[str, Any]]:
    """One row per trial in creation order: trial, state, epochs run, the searched params, val/map and test/map at
    the trial's best epoch, that epoch, MLflow run id. State: errored (Tune's error), completed (all epochs), else
    early-stopped."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        epochs = int(metrics.get("epoch", 0))
        state = "errored" if result.error is not None else "completed" if epochs >= planned_epochs else "early-stopped"
        row: dict[str, Any] = {"trial": _trial_name(result), "state": state, "epochs": epochs}
        row |= {key: result.config.get(key) for key in space}
        row |= {METRIC: float(metrics.get(BEST_METRIC, math.nan)),
                "test/map": float(metrics.get("best/test/map", math.nan)),
                "best_epoch": int(metrics.get("best/epoch", 0)), "mlflow_run_id": metrics.get(RUN_ID_KEY, "")}
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def _trial_name(result: tune.Result) -> str:
    """From the last result's experiment tag, or from the trial's directory name (it starts with the trial name)
    for a trial that errored before reporting."""
    tag = (result.metrics or {}).get("experiment_tag")
    return trial_label(str(tag)) if tag else str(result.path).rstrip("/").rsplit("/", 1)[-1].split("_", 1)[0]


def best_row(grid: tune.ResultGrid, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The row of the best trial: Tune's choice by the best-on-val score (`get_best_result`, scope 'last': the
    score every trial reports is its best so far), never an errored trial; None when no trial has a score."""
    by_run = {r["mlflow_run_id"]: r for r in rows if r["state"] != "errored" and math.isfinite(r[METRIC])}
    try:
        best = grid.get_best_result(BEST_METRIC, MODE, scope="last")
    except RuntimeError:  # no trial reported the metric
        return None
    chosen = by_run.get((best.metrics or {}).get(RUN_ID_KEY))
    if chosen is None and by_run:  # Tune chose an errored trial: the best among the others, first on a tie
        chosen = max(by_run.values(), key=lambda r: (r[METRIC], -rows.index(r)))
    return dict(chosen) if chosen else None


def log_inputs(parent: RunTracker, settings: Mapping[str, Any], space: Mapping[str, Dimension], base: Config) -> None:
    """The sweep's settings as `sweep.*` params, its search space and its base config as artifacts."""
    parent.log_params({f"sweep.{k}": v for k, v in settings.items()})
    parent.log_dict({k: d.describe() for k, d in space.items()}, "search_space.yaml")
    parent.log_dict(to_dict(base), "base_config.yaml")


def log_results(parent: RunTracker, space: Mapping[str, Dimension], rows: list[dict[str, Any]],
                best: dict[str, Any] | None, best_config: Config | None) -> None:
    """Trials table (Parquet, CSV, Markdown), state counts, optimization history and parallel coordinates, and the
    best configuration with its run."""
    parent.log_table(rows, "trials")
    parent.log_text(f"Trials by {METRIC} at each trial's best epoch (the best first, marked):\n\n"
                    + markdown_table(ranked(rows), columns(space), best), "tables/trials.md")
    counts = {state: sum(r["state"] == state for r in rows) for state in STATES}
    # Step = the driver session that ended (first run 1, each resume one more): the point at the highest step is the
    # sweep's final state, even when a resume changes states without adding trials (--restart-errored).
    step = (parent.last_step("trials/completed") or 0) + 1
    parent.log_metrics({f"trials/{k.replace('-', '_')}": v for k, v in counts.items()}, step=step)
    parent.log_figure(study_plots.plot_optimization_history([r[METRIC] for r in rows], [r["state"] for r in rows],
                                                            METRIC), "plots/optimization_history.png")
    logs = tuple(k for k, d in space.items() if d.kind == "loguniform")
    parent.log_figure(study_plots.plot_parallel_coordinates(rows, list(space), METRIC, log_params=logs),
                      "plots/parallel_coordinates.png")
    if best is None or best_config is None:
        parent.set_tags({"sweep.best": "none: no trial reported val/map"})
        return
    parent.log_dict({k: best[k] for k in space}, "best_overrides.yaml")
    parent.log_dict(to_dict(best_config), "best_config.yaml")
    parent.log_metrics({BEST_METRIC: best[METRIC], "best/test/map": best["test/map"]}, step=step)
    parent.set_tags({"sweep.best_trial": best["trial"], "sweep.best_run_id": best["mlflow_run_id"]})


def columns(space: Mapping[str, Any]) -> list[str]:
    return ["trial", "state", "epochs", *space, METRIC, "test/map", "best_epoch"]


BEST_MARK = " (best)"


def ranked(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Trials by val/map, the highest first; trials without a score (errored) last; ties keep creation order."""
    return sorted(rows, key=lambda r: -r[METRIC] if math.isfinite(r[METRIC]) else math.inf)


def markdown_table(rows: Sequence[Mapping[str, Any]], names: Sequence[str],
                   best: Mapping[str, Any] | None = None) -> str:
    """A GitHub Markdown table of the columns `names` (floats to 4 significant digits, NaN as '-'); the `best`
    trial's name carries BEST_MARK."""
    return tables.markdown(_frame(rows, names, best)) + "\n"


def format_trials(rows: Sequence[Mapping[str, Any]], space: Mapping[str, Any], limit: int = 20,
                  best: Mapping[str, Any] | None = None) -> str:
    """A fixed-width console table of the best `limit` trials by val/map, the `best` one marked."""
    text = tables.text(_frame(ranked(rows)[:limit], columns(space), best))
    if len(rows) > limit:
        text += f"\n... {len(rows) - limit} more trials in the MLflow parent run's tables/trials.csv"
    return text


def _frame(rows: Sequence[Mapping[str, Any]], names: Sequence[str],
           best: Mapping[str, Any] | None = None) -> pd.DataFrame:
    def cell(row: Mapping[str, Any], name: str) -> str:
        text = tables.number(row.get(name, ""))
        return text + BEST_MARK if name == "trial" and best is not None and row.get("trial") == best["trial"] else text

    return pd.DataFrame([[cell(row, c) for c in names] for row in rows], columns=list(names))


# --------------------------------------------------------------------------------------------- confirmation


def summarize_confirm(ranked: Sequence[Mapping[str, Any]], ranks: Sequence[int],
                      metrics: Sequence[Mapping[str, float]], space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per confirmed config: its params, the number of seeds that finished, and mean / std of CONFIRM_METRICS
    (sample std, ddof=1; NaN with a single seed)."""
    out = []
    for rank, row in enumerate(ranked, 1):
        runs = [m for r, m in zip(ranks, metrics, strict=True) if r == rank and m]
        entry: dict[str, Any] = {"rank": rank, "source_trial": row["trial"], **{k: row[k] for k in space},
                                 "n": len(runs)}
        for key in CONFIRM_METRICS:
            values = np.array([m[key] for m in runs if key in m], dtype=float)
            entry[f"{key}/mean"] = float(values.mean()) if values.size else math.nan
            entry[f"{key}/std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
        out.append(entry)
    return out


def format_confirm(summary: Sequence[Mapping[str, Any]], space: Mapping[str, Any]) -> str:
    """A Markdown table: rank, params, seeds, mean ± std of the confirmation metrics."""
    names = ["rank", *space, "n", *CONFIRM_METRICS]
    rows = []
    for e in summary:
        cells = {c: e[c] for c in ("rank", *space, "n")}
        cells |= {k: tables.mean_std(e[f"{k}/mean"], e[f"{k}/std"]) for k in CONFIRM_METRICS}
        rows.append(cells)
    return markdown_table(rows, names)


def log_confirm(parent: RunTracker, summary: list[dict[str, Any]], space: Mapping[str, Any]) -> None:
    parent.log_table(summary, "confirm")
    parent.log_text(format_confirm(summary, space), "tables/confirm.md")
    metrics = {f"confirm/top{e['rank']}/{k.replace('best/', '').replace('/', '_')}_{stat}": e[f"{k}/{stat}"]
               for e in summary for k in CONFIRM_METRICS for stat in ("mean", "std")}
    done = sum(e["n"] for e in summary)  # step = confirmation runs that finished (grows on a resume)
    parent.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=done)
