"""The hyperparameter sweep: Optuna (TPE, seeded; the paper's defaults first) + ASHA on `val/map` per epoch under one
MLflow parent run, its trial table and plots, and the confirmation of the top K configurations over N seeds.

Built on `comic.tune` (search spaces, Ray connection and storage checks, Tuner plumbing, `run_configs`); like it,
imports Ray, Optuna and MLflow only inside functions.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from comic.config import Config, apply_overrides, from_dict, to_dict
from comic.tune import (
    CONFIRM_METRICS,
    DEFAULT_SPACE,
    METRIC,
    MODE,
    STATE_FILE,
    Dimension,
    Resources,
    TuneError,
    absolute_storage,
    check_cluster_storage,
    connect_ray,
    default_point,
    experiment_path,
    fit_tuner,
    is_remote_path,
    make_run_config,
    parse_space,
    prepare_configs,
    progress_callback,
    run_configs,
    trial_trainable,
)


@dataclass
class SweepSpec:
    """A TPE + ASHA sweep: the base config, the space, the budget and where it runs and logs."""

    base: Config
    space: dict[str, Dimension] = field(default_factory=lambda: parse_space(DEFAULT_SPACE))
    num_samples: int = 12
    seed: int = 0
    grace_period: int = 2
    reduction_factor: int = 2
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 1
    storage_path: str = ""
    name: str = ""
    tracking_uri: str | None = None
    experiment: str = "comic-sweep"
    shared_storage: bool = False
    confirm_top: int = 0
    confirm_seeds: int = 3

    def check(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: must be >= 1")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("grace_period must be >= 1 and reduction_factor >= 2")
        if self.confirm_top < 0 or self.confirm_seeds < 1:
            raise ValueError("confirm_top must be >= 0 and confirm_seeds >= 1")


@dataclass
class SweepResult:
    """What a finished sweep leaves: one row per trial, the best one, and the confirmation summary (if asked)."""

    name: str
    experiment_path: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: Config | None
    best_config_path: str | None = None
    confirm: list[dict[str, Any]] = field(default_factory=list)


def _resolve(spec: SweepSpec) -> SweepSpec:
    from comic.tracking import resolve_tracking_uri

    spec.check()
    name = spec.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    return replace(spec, name=name, storage_path=absolute_storage(spec.storage_path),
                   tracking_uri=resolve_tracking_uri(spec.tracking_uri))


def _state_fs(path: str) -> tuple[Any, str]:
    from pyarrow import fs

    return fs.FileSystem.from_uri(path)


def _save_state(spec: SweepSpec, parent_run_id: str) -> None:
    """The sweep's settings and parent run next to Tune's state (on S3 too): `resume` needs only the path."""
    state = {"parent_run_id": parent_run_id, "tracking_uri": spec.tracking_uri, "experiment": spec.experiment,
             "base": to_dict(spec.base), "space": {k: d.describe() for k, d in spec.space.items()},
             "num_samples": spec.num_samples, "seed": spec.seed, "grace_period": spec.grace_period,
             "reduction_factor": spec.reduction_factor, "max_failures": spec.max_failures,
             "resources": vars(spec.resources), "shared_storage": spec.shared_storage}
    filesystem, path = _state_fs(experiment_path(spec.storage_path, spec.name))
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(f"{path}/{STATE_FILE}") as out:
        out.write(json.dumps(state, indent=2, default=str).encode())


def load_sweep(storage_path: str | None, name: str | None = None) -> tuple[SweepSpec, str]:
    """The saved spec and parent run id of sweep `name` (default: the latest one in a local storage path)."""
    storage = absolute_storage(storage_path)
    name = name or _latest_sweep(storage)
    filesystem, path = _state_fs(f"{experiment_path(storage, name)}/{STATE_FILE}")
    try:
        with filesystem.open_input_stream(path) as fh:
            state = json.loads(fh.read().decode())
    except FileNotFoundError as err:
        raise TuneError(f"no sweep to resume at {experiment_path(storage, name)} (no {STATE_FILE}); check "
                        "--storage-path and --name") from err
    spec = SweepSpec(base=from_dict(state["base"]), space=parse_space(state["space"]),
                     num_samples=state["num_samples"], seed=state["seed"], grace_period=state["grace_period"],
                     reduction_factor=state["reduction_factor"], resources=Resources(**state["resources"]),
                     max_failures=state["max_failures"], storage_path=storage, name=name,
                     tracking_uri=state["tracking_uri"], experiment=state["experiment"],
                     shared_storage=state["shared_storage"])
    return spec, state["parent_run_id"]


def _latest_sweep(storage: str) -> str:
    if is_remote_path(storage):
        raise TuneError(f"give the sweep's --name to resume it from {storage}")
    found = sorted(Path(storage).glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise TuneError(f"no sweep to resume in {storage}; check --storage-path")
    return found[-1].parent.name


def run_sweep(spec: SweepSpec, *, resume: bool = False, callbacks: Sequence[Any] = ()) -> SweepResult:
    """Run (or with `resume`, continue) an Optuna TPE + ASHA sweep under one MLflow parent run; then, if
    `spec.confirm_top`, rerun the best configs over `spec.confirm_seeds` seeds without early stopping.

    Connects to Ray first if needed (see `connect_ray`). Raises TuneInterrupted when stopped before the end
    (the parent run ends KILLED; `resume=True` with the same storage path and name continues it).
    """
    from comic.tracking import RunTracker, ensure_experiment, run_tags

    spec = _resolve(spec)
    connect_ray()
    check_cluster_storage(spec.storage_path, spec.tracking_uri, spec.shared_storage)
    parent_id = _parent_for(spec, resume)
    spec = replace(spec, base=prepare_configs([spec.base])[0])
    ensure_experiment(spec.tracking_uri, spec.experiment)
    tags = run_tags({"sweep.name": spec.name, "sweep.path": experiment_path(spec.storage_path, spec.name),
                     "sweep.kind": "optuna-tpe+asha"})
    with RunTracker(spec.tracking_uri, spec.experiment, run_name=spec.name, run_id=parent_id, tags=tags) as parent:
        if parent_id is None:
            _save_state(spec, parent.run_id)
        _log_inputs(parent, spec)
        grid = _search(spec, parent.run_id, resume, callbacks)
        rows = trial_rows(grid, spec.space)
        best = best_row(rows)
        best_config = apply_overrides(spec.base, {k: best[k] for k in spec.space}) if best else None
        _log_results(parent, spec, rows, best, best_config)
        best_path = _save_best(spec, best_config) if best_config else None
        confirm = _confirm(spec, rows, parent) if spec.confirm_top else []
    return SweepResult(spec.name, experiment_path(spec.storage_path, spec.name), spec.tracking_uri, spec.experiment,
                       parent.run_id, rows, best, best_config, best_path, confirm)


def _save_best(spec: SweepSpec, best_config: Config) -> str:
    """The best configuration, in full, beside the sweep's Tune state: `train.py --config` takes it as is."""
    import yaml

    path = f"{experiment_path(spec.storage_path, spec.name)}/best_config.yaml"
    filesystem, fs_path = _state_fs(path)
    with filesystem.open_output_stream(fs_path) as out:
        out.write(yaml.safe_dump(to_dict(best_config), sort_keys=False).encode())
    return path


def _parent_for(spec: SweepSpec, resume: bool) -> str | None:
    """The parent run id to reattach on resume; a new sweep must not reuse an existing experiment directory."""
    from ray import tune

    path = experiment_path(spec.storage_path, spec.name)
    filesystem, state = _state_fs(f"{path}/{STATE_FILE}")
    saved = filesystem.get_file_info(state).type.name != "NotFound"
    if resume:
        if not saved:
            raise TuneError(f"nothing to resume at {path}; run without --resume to start this sweep")
        return load_sweep(spec.storage_path, spec.name)[1]
    if saved or tune.Tuner.can_restore(path):
        raise TuneError(f"sweep {spec.name!r} already exists at {path}: add --resume to continue it, or pick "
                        "another --name")
    return None


def _search(spec: SweepSpec, parent_run_id: str, resume: bool, callbacks: Sequence[Any]) -> Any:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from comic.tune_runtime import EpochASHA, RunStates, SweepTrialName, TrialJob

    job = TrialJob(spec.tracking_uri, spec.experiment, parent_run_id, "search", base=to_dict(spec.base))
    trainable = trial_trainable(job, spec.resources)
    point = default_point(spec.space, spec.base)
    epochs = spec.base.train.epochs
    all_callbacks = [RunStates(spec.tracking_uri, spec.experiment, parent_run_id), progress_callback(tuple(spec.space)),
                     *callbacks]

    def make_tuner() -> Any:
        searcher = OptunaSearch(points_to_evaluate=[point] if point else None, seed=spec.seed)
        scheduler = EpochASHA(time_attr="epoch", max_t=epochs, grace_period=min(spec.grace_period, epochs),
                              reduction_factor=spec.reduction_factor)
        config = tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                 num_samples=spec.num_samples, trial_name_creator=SweepTrialName(),
                                 max_concurrent_trials=spec.resources.max_concurrent or None)
        return tune.Tuner(trainable, param_space={k: d.to_tune() for k, d in spec.space.items()}, tune_config=config,
                          run_config=make_run_config(spec.name, spec.storage_path, spec.max_failures, all_callbacks))

    # An errored search trial is a result of its hyperparameters (e.g. divergence): resume does not retry it.
    return fit_tuner(experiment_path(spec.storage_path, spec.name), trainable, make_tuner, expected=spec.num_samples,
                resume=resume, resume_errored=False)


# --------------------------------------------------------------------------------------------- results


def trial_rows(grid: Any, space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per trial in creation order: trial, state, epochs run, the searched params, val/map (best epoch),
    test/map at that epoch, best epoch, MLflow run id."""
    from comic.tune_runtime import FINAL_KEY, RUN_ID_KEY

    rows = []
    for result in grid:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        row: dict[str, Any] = {"trial": _trial_name(result), "state": "completed"}
        if result.error is not None:
            row["state"] = "errored"
        elif not metrics.get(FINAL_KEY):
            row["state"] = "early-stopped"
        row |= {key: result.config.get(key) for key in space}
        row |= _best_epoch(history)
        row["mlflow_run_id"] = metrics.get(RUN_ID_KEY, "")
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def _trial_name(result: Any) -> str:
    """From the last result's experiment tag, or from the trial's directory name (it starts with the trial name)
    for a trial that errored before reporting."""
    from comic.tune_runtime import trial_label

    tag = (result.metrics or {}).get("experiment_tag")
    return trial_label(str(tag)) if tag else Path(str(result.path)).name.split("_", 1)[0]


def _best_epoch(history: Any) -> dict[str, Any]:
    """The epoch with the highest val/map (the first on a tie; NaN never wins), as fit picks its best epoch."""
    empty = {"epochs": 0, METRIC: math.nan, "test/map": math.nan, "best_epoch": 0}
    if history is None or METRIC not in history or history.empty:
        return empty
    epochs = int(history["epoch"].max()) if "epoch" in history else 0
    scores = history[METRIC].astype(float)
    if scores.isna().all():
        return empty | {"epochs": epochs}
    at = scores.idxmax()
    test = float(history["test/map"][at]) if "test/map" in history else math.nan
    return {"epochs": epochs, METRIC: float(scores[at]), "test/map": test, "best_epoch": int(history["epoch"][at])}


def best_row(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The row with the highest val/map (the earliest trial on a tie), or None when no trial has a score."""
    scored = [r for r in rows if isinstance(r.get(METRIC), float) and math.isfinite(r[METRIC])]
    return dict(max(scored, key=lambda r: (r[METRIC], -rows.index(r)))) if scored else None


def _log_inputs(parent: Any, spec: SweepSpec) -> None:
    parent.log_params({"sweep.metric": f"{METRIC} ({MODE})", "sweep.num_samples": spec.num_samples,
                       "sweep.seed": spec.seed, "sweep.max_t": spec.base.train.epochs,
                       "sweep.grace_period": spec.grace_period, "sweep.reduction_factor": spec.reduction_factor,
                       "sweep.cpus_per_trial": spec.resources.cpus_per_trial,
                       "sweep.gpus_per_trial": spec.resources.gpus_per_trial,
                       "sweep.max_concurrent": spec.resources.max_concurrent, "sweep.max_failures": spec.max_failures})
    parent.log_dict({k: d.describe() for k, d in spec.space.items()}, "search_space.yaml")
    parent.log_dict(to_dict(spec.base), "base_config.yaml")


def _log_results(parent: Any, spec: SweepSpec, rows: list[dict[str, Any]], best: dict[str, Any] | None,
                 best_config: Config | None) -> None:
    from comic import plots

    parent.log_table(rows, "trials")
    parent.log_text(markdown_table(rows, _columns(spec.space)), "tables/trials.md")
    counts = {state: sum(r["state"] == state for r in rows) for state in ("completed", "early-stopped", "errored")}
    parent.log_metrics({f"trials/{k.replace('-', '_')}": v for k, v in counts.items()}, step=0)
    values = [r[METRIC] for r in rows]
    parent.log_figure(plots.plot_optimization_history(values, [r["state"] for r in rows], METRIC),
                      "plots/optimization_history.png")
    logs = tuple(k for k, d in spec.space.items() if d.kind == "loguniform")
    parent.log_figure(plots.plot_parallel_coordinates(rows, list(spec.space), METRIC, log_params=logs),
                      "plots/parallel_coordinates.png")
    if best is None or best_config is None:
        parent.set_tags({"sweep.best": "none: no trial reported val/map"})
        return
    parent.log_dict({k: best[k] for k in spec.space}, "best_overrides.yaml")
    parent.log_dict(to_dict(best_config), "best_config.yaml")
    parent.log_metrics({f"best/{METRIC}": best[METRIC], "best/test/map": best["test/map"]}, step=0)
    parent.set_tags({"sweep.best_trial": best["trial"], "sweep.best_run_id": best["mlflow_run_id"]})


def _columns(space: Mapping[str, Any]) -> list[str]:
    return ["trial", "state", "epochs", *space, METRIC, "test/map", "best_epoch"]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of `columns` (floats to 4 significant digits, NaN as '-')."""
    import pandas as pd

    from comic.tables import markdown

    cells = pd.DataFrame([[_cell(row.get(c, "")) for c in columns] for row in rows], columns=list(columns))
    return markdown(cells) + "\n"


def format_trials(rows: Sequence[Mapping[str, Any]], space: Mapping[str, Any], limit: int = 20) -> str:
    """A fixed-width console table of the best `limit` trials by val/map."""
    columns = _columns(space)
    ranked = sorted(rows, key=lambda r: -r[METRIC] if math.isfinite(r[METRIC]) else math.inf)[:limit]
    cells = [[_cell(r.get(c, "")) for c in columns] for r in ranked]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more trials in the MLflow parent run's tables/trials.csv")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- confirmation


def _confirm(spec: SweepSpec, rows: list[dict[str, Any]], parent: Any) -> list[dict[str, Any]]:
    """Rerun the top `confirm_top` configs over `confirm_seeds` seeds (no early stopping) and summarize them."""
    ranked = sorted((r for r in rows if math.isfinite(r[METRIC])), key=lambda r: -r[METRIC])[:spec.confirm_top]
    configs, names, tags, ranks = [], [], [], []
    for rank, row in enumerate(ranked, 1):
        for offset in range(spec.confirm_seeds):
            seed = spec.base.seed + offset
            configs.append(apply_overrides(spec.base, {k: row[k] for k in spec.space} | {"seed": seed}))
            names.append(f"top{rank}-seed{seed}")
            tags.append({"confirm.rank": str(rank), "confirm.source_trial": row["trial"], "sweep.phase": "confirm"})
            ranks.append(rank)
    parent.set_tags({"confirm.top": str(spec.confirm_top), "confirm.seeds": str(spec.confirm_seeds)})
    # The settings are in the name: a resume with other ones starts a new confirmation instead of mixing them.
    name = f"{spec.name}-confirm-top{spec.confirm_top}x{spec.confirm_seeds}"
    metrics = run_configs(configs, names=names, storage_path=spec.storage_path, name=name,
                          tracking_uri=spec.tracking_uri, experiment=spec.experiment, parent_run_id=parent.run_id,
                          resources=spec.resources, max_failures=spec.max_failures, resume=True, tags=tags,
                          shared_storage=spec.shared_storage)
    summary = summarize_confirm(ranked, ranks, metrics, spec.space)
    _log_confirm(parent, summary, spec.space)
    return summary


def summarize_confirm(ranked: Sequence[Mapping[str, Any]], ranks: Sequence[int], metrics: Sequence[Mapping[str, float]],
                      space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per confirmed config: its params, the number of seeds that finished, and mean / std of CONFIRM_METRICS
    (sample std, ddof=1; NaN with a single seed)."""
    import numpy as np

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


def _mean_std(entry: Mapping[str, Any], key: str) -> str:
    mean, std = entry[f"{key}/mean"], entry[f"{key}/std"]
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def format_confirm(summary: Sequence[Mapping[str, Any]], space: Mapping[str, Any]) -> str:
    """A Markdown table: rank, params, seeds, mean ± std of the confirmation metrics."""
    columns = ["rank", *space, "n", *CONFIRM_METRICS]
    rows = [{**{c: e[c] for c in ("rank", *space, "n")}, **{k: _mean_std(e, k) for k in CONFIRM_METRICS}}
            for e in summary]
    return markdown_table(rows, columns)


def _log_confirm(parent: Any, summary: list[dict[str, Any]], space: Mapping[str, Any]) -> None:
    parent.log_table(summary, "confirm")
    parent.log_text(format_confirm(summary, space), "tables/confirm.md")
    metrics = {f"confirm/top{e['rank']}/{k.replace('best/', '').replace('/', '_')}_{stat}": e[f"{k}/{stat}"]
               for e in summary for k in CONFIRM_METRICS for stat in ("mean", "std")}
    parent.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=0)
