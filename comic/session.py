"""One tracked training run: `fit` plus its MLflow record (params, tags, per-epoch metrics, tables and plots).

Used by `experiments/train.py` and by every Ray Tune trial, so a single run and a sweep trial leave the same record.
The MLflow run id is kept in the work directory: a resumed run reattaches to its own MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from comic.config import Config, to_dict, to_flat_dict
from comic.engine import RESUMABLE_CHANGES, FitResult, Report, fit

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
TABLE_GROUPS = ("map", "map_many", "map_medium", "map_few", "map_avg")


def tracked_fit(cfg: Config, *, tracking_uri: str, experiment: str, workdir: str | Path,
                run_name: str | None = None, parent_run_id: str | None = None, report: Report | None = None,
                tags: dict[str, str] | None = None) -> tuple[FitResult, str]:
    """Run `fit(cfg)` in an MLflow run (ends FINISHED / FAILED / KILLED, never RUNNING); return it and the run id."""
    from comic.tracking import RunTracker

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    id_file = workdir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    tracker = RunTracker(tracking_uri, experiment, run_name=run_name, parent_run_id=parent_run_id, run_id=run_id,
                         tags=_tags(cfg, tags))
    with tracker:
        id_file.write_text(tracker.run_id)
        params, mutable = _split_params(cfg)
        tracker.log_params(params)
        tracker.set_tags(mutable)
        tracker.log_dict(to_dict(cfg), "config.yaml")

        def on_epoch(metrics: dict[str, float]) -> None:
            tracker.log_metrics(_finite(metrics), step=int(metrics["epoch"]))
            if report is not None:
                report(metrics)

        result = fit(cfg, on_epoch, workdir=workdir)
        for metrics in result.history:  # an epoch checkpointed but not yet logged before a crash; duplicates drop
            tracker.log_metrics(_finite(metrics), step=int(metrics["epoch"]))
        best = {k: v for k, v in result.metrics.items() if k.startswith("best/")}
        tracker.log_metrics(_finite(best), step=int(result.metrics.get("epoch", 0)))
        log_artifacts(tracker, result)
    return result, tracker.run_id


def _split_params(cfg: Config) -> tuple[dict[str, object], dict[str, str]]:
    """MLflow params are immutable, but a resumed run may change the engine knobs or extend the schedule (what
    the trainer allows on resume): those keys go out as tags (`config.<key>`), the rest as params."""
    params, mutable = {}, {}
    for key, value in to_flat_dict(cfg).items():
        if key.startswith(RESUMABLE_CHANGES):
            mutable[f"config.{key}"] = str(value)
        else:
            params[key] = value
    return params, mutable


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """NaN marks an empty shot group or an epoch without corrections: left out of MLflow rather than plotted."""
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def _tags(cfg: Config, extra: dict[str, str] | None) -> dict[str, str]:
    from comic.data.benchmark import ensure_benchmark
    from comic.runtime import resolve_device
    from comic.tracking import run_tags

    device = resolve_device(cfg.engine.device)
    card = json.loads((ensure_benchmark(cfg.data) / "card.json").read_text())
    base = {"method": cfg.method, "seed": str(cfg.seed), "dataset": cfg.data.benchmark,
            "dataset_hash": str(card.get("hash", "")), "device": _device_name(device)}
    return run_tags(base | (extra or {}))


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def log_artifacts(tracker, result: FitResult) -> None:
    """Per-class AP table (Parquet + CSV) and the plots: mAP curves, shot groups, corrections, class distribution."""
    from comic import plots

    best = result.per_class.get("best")
    if best:
        tracker.log_table(best, "per_class_ap")
        tracker.log_figure(plots.plot_per_class_ap(best["class"], best["test_ap"], best["train_observed"]),
                           "per_class_ap.png")
    tracker.log_figure(plots.plot_map_curves(result.history), "map_curves.png")
    shots = {k.split("/", 1)[1]: v for k, v in result.metrics.items() if k.startswith("best/test/map")}
    tracker.log_figure(plots.plot_shot_groups(shots, "test mAP at the best-on-val epoch"), "shot_groups.png")
    last = result.per_class.get("last")
    if last and any(k.startswith("rlc/") for k in result.history[-1]):
        tracker.log_figure(plots.plot_corrections(result.history), "rlc_corrections.png")
        corrected = np.add(last["train_observed"], np.add(last["rlc_tp"], last["rlc_fp"])).tolist()
        tracker.log_figure(plots.plot_class_distribution(last["class"], last["train_observed"], corrected,
                                                         last["train_full"]), "class_distribution.png")


def format_table(metrics: dict[str, float]) -> str:
    """A small fixed-width table: rows val/test x (best epoch, last epoch), columns total/many/medium/few/average."""
    header = f"{'':<18}" + "".join(f"{g.replace('map_', '') if g != 'map' else 'total':>9}" for g in TABLE_GROUPS)
    lines = [header]
    for split in ("val", "test"):
        for label, prefix in (("best", "best/"), ("last", "")):
            values = [metrics.get(f"{prefix}{split}/{g}") for g in TABLE_GROUPS]
            cells = "".join(f"{v:9.2f}" if isinstance(v, (int, float)) else f"{'-':>9}" for v in values)
            lines.append(f"{split + ' (' + label + ')':<18}{cells}")
    if "test/map_chance" in metrics:
        lines.append(f"label-frequency baseline (chance) test mAP: {metrics['test/map_chance']:.2f}")
    best_epoch = metrics.get("best/epoch")
    if best_epoch is not None:
        lines.append(f"best epoch by val/map: {int(best_epoch)} of {int(metrics.get('epoch', 0))}")
    return "\n".join(lines)
