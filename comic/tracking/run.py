"""One tracked training run: `fit` plus its MLflow record (params, tags, per-epoch metrics, tables and plots).

Used by `experiments/train.py`, by every ablation cell and by every Ray Tune trial, so all of them leave the same
record. The MLflow run id is kept in the work directory: a resumed run reattaches to its own MLflow run.
Params are the keys of the run's identity (`comic.config.identity`, resumable form); the keys a resumed run may
change (execution knobs, the schedule's length) go out as tags `config.<key>`, because MLflow params are immutable.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from mlflow.entities import Dataset, Run

from comic.checkpoint import CheckpointPolicy, RunCheckpoint, RunState
from comic.config import Config, identity, load_config, to_dict, to_flat_dict
from comic.data.build import ensure_benchmark
from comic.data.images import trunk_preprocess
from comic.data.reader import CARD_JSON, content_digest
from comic.device import device_name, resolve_device
from comic.engine import SCORES_ARTIFACT_DIR, TEST_SCORES, FitResult, Report, fit
from comic.models.backbone import weights_id
from comic.presets import SMOKE_OVERRIDES
from comic.report import plots
from comic.tracking.client import RunTracker
from comic.tracking.model import log_best_model
from comic.tracking.provenance import run_tags
from comic.tracking.store import find_run

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
LOG_EVERY_S = 10.0  # at most this long between an epoch's end and its metrics in MLflow


def tracked_fit(cfg: Config, *, tracking_uri: str, experiment: str, workdir: str | Path,
                run_name: str | None = None, parent_run_id: str | None = None, report: Report | None = None,
                tags: dict[str, str] | None = None, detach_on_exit: bool = False,
                policy: CheckpointPolicy | None = None, log_model: bool = False) -> tuple[FitResult, str]:
    """Run `fit(cfg)` in an MLflow run (ends FINISHED / FAILED / KILLED, never RUNNING); return it and the run id.

    The artifacts (tables, plots) are logged at the last epoch before `report` sees it, so a trial that its
    scheduler stops there keeps them. `detach_on_exit`: see `RunTracker` (Ray Tune trials). `policy`: when to
    checkpoint (default: `train.checkpoint_every_s`). `log_model`: export the best-on-val model and log it as the
    run's MLflow model (`comic.tracking.model`; its URI in the run's tag `model_uri`).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    bench_dir = ensure_benchmark(cfg.data)
    card = json.loads((bench_dir / CARD_JSON).read_text())
    # Another run's checkpoint is refused before its MLflow run is reattached: reattaching would log clashing params
    # onto that run and end it FAILED.
    checkpoint = RunCheckpoint(cfg, workdir, content_digest(card))
    checkpoint.check()
    run = _earlier_run(workdir, tracking_uri)
    done = checkpoint.finished(cfg.train.epochs) if run is not None and run.info.status == "FINISHED" else None
    if done is not None:
        log.info("run %s already finished in %s: its results, nothing trained", run.info.run_id, workdir)
        return FitResult.of(done, workdir, already_finished=True), run.info.run_id
    tracker = RunTracker(tracking_uri, experiment, run_name=run_name, parent_run_id=parent_run_id,
                         run_id=run.info.run_id if run is not None else None, tags=_tags(cfg, card, tags),
                         detach_on_exit=detach_on_exit)
    with tracker:
        (workdir / RUN_ID_FILE).write_text(tracker.run_id)
        _log_inputs(tracker, cfg, card, bench_dir)
        artifacts_logged = []
        curves = _Curves(tracker)

        def on_epoch(metrics: dict[str, float], run: RunState) -> None:
            curves.add(metrics, saved=run.saved)
            if int(metrics["epoch"]) == cfg.train.epochs:  # saved, so its metrics are in MLflow already
                log_artifacts(tracker, FitResult.of(run, workdir))
                artifacts_logged.append(True)
            if report is not None:
                report(metrics, run)

        try:
            result = fit(cfg, on_epoch, workdir=workdir, policy=policy)
        finally:
            curves.flush()
        curves.add_all(result.history)  # epochs an earlier, interrupted process saved but never logged; duplicates drop
        if not artifacts_logged:  # the last epoch ran in an earlier, interrupted process
            log_artifacts(tracker, result)
        if log_model:
            log_best_model(tracker, cfg, workdir)
    return result, tracker.run_id


class _Curves:
    """Per-epoch metrics to MLflow in batches, one store call each: when the epoch is on disk (the record never lags
    a checkpoint), at least every LOG_EVERY_S seconds (the UI stays live), and when the run ends (also by an error or
    an interrupt). NaN marks an empty shot group or an epoch without corrections: left out rather than plotted."""

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker, self.rows, self.flushed = tracker, [], time.monotonic()

    def add(self, metrics: dict[str, float], saved: bool = False) -> None:
        self.rows.append((int(metrics["epoch"]), {k: v for k, v in metrics.items() if math.isfinite(v)}))
        if saved or time.monotonic() - self.flushed >= LOG_EVERY_S:
            self.flush()

    def add_all(self, history: list[dict[str, float]]) -> None:
        for metrics in history:
            self.add(metrics)
        self.flush()

    def flush(self) -> None:
        if self.rows:
            self.tracker.log_steps(self.rows)
        self.rows, self.flushed = [], time.monotonic()


def _earlier_run(workdir: Path, tracking_uri: str) -> Run | None:
    """The MLflow run this work directory belongs to, if the tracking store has it. A work directory that
    remembers a run of another store (or a deleted one) starts a new run, with a warning saying why."""
    id_file = workdir / RUN_ID_FILE
    if not id_file.is_file():
        return None
    run_id = id_file.read_text().strip()
    run = find_run(tracking_uri, run_id)
    if run is None:
        log.warning("%s remembers MLflow run %s, which the tracking store %s does not hold (another store, or a "
                    "deleted run): starting a new run", workdir, run_id, tracking_uri)
    return run


def split_params(cfg: Config) -> tuple[dict[str, object], dict[str, str]]:
    """(params, tags): the run's identity as params; every other key as a tag `config.<key>` (may change)."""
    fixed = identity(cfg, resumable=True)
    params, mutable = {}, {}
    for key, value in to_flat_dict(cfg).items():
        if key in fixed:
            params[key] = value
        else:
            mutable[f"config.{key}"] = str(value)
    return params, mutable


def _log_inputs(tracker: RunTracker, cfg: Config, card: dict, bench_dir: Path) -> None:
    params, mutable = split_params(cfg)
    tracker.log_params(params)
    tracker.set_tags(mutable)
    tracker.log_dict(to_dict(cfg), "config.yaml")
    tracker.log_dict(card, "dataset/card.json")
    tracker.log_dict(trunk_record(cfg), "dataset/trunk.json")
    log_benchmark(tracker, bench_dir)


def trunk_record(cfg: Config) -> dict:
    """What the trunk saw: its name, its weights' identity and its preprocessing (timm's data config or
    torchvision's ImageNet recipe): the pixels' half of what a run was trained on."""
    return {"backbone": cfg.model.backbone, "weights": weights_id(cfg.model), "profile": cfg.model.profile,
            "preprocess": trunk_preprocess(cfg.model, cfg.data.image_size).describe()}


def smoke_model(folder: Path) -> tuple[str, str]:
    """Train the scripts' smoke configuration in `folder` with its model logged (a script's `--smoke-test` needs a
    model to use); returns (the run's `runs:/` URI, the SQLite tracking URI)."""
    cfg = load_config("synthetic", SMOKE_OVERRIDES | {"data.cache_dir": str(folder / "data"), "engine.progress": False})
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    _, run_id = tracked_fit(cfg, tracking_uri=uri, experiment="comic-train", workdir=folder / "run", log_model=True)
    return f"runs:/{run_id}", uri


def log_benchmark(tracker: RunTracker, bench_dir: Path, context: str = "train") -> None:
    """The built benchmark in `bench_dir` as an MLflow dataset of the run (the runs table's Dataset column): its
    name, content digest, folder and split sizes; `context`: 'train' (what a run trained on), 'eval'."""
    card = json.loads((bench_dir / CARD_JSON).read_text())
    profile = {"benchmark": card.get("benchmark"), "classes": len(card.get("class_names", [])),
               "splits": {k: v for k, v in card.get("sizes", {}).items() if k in ("train", "val", "test")}}
    dataset = Dataset(str(card.get("name", bench_dir.name)), content_digest(card)[:16], "local",
                      json.dumps({"uri": str(bench_dir)}), profile=json.dumps(profile))
    tracker.log_dataset(dataset, context)


def _tags(cfg: Config, card: dict, extra: dict[str, str] | None) -> dict[str, str]:
    """Provenance, and what was trained on as the benchmark's card says (not as the config's data.* keys say)."""
    base = {"method": cfg.method, "seed": str(cfg.seed), "dataset": str(card.get("benchmark", "")),
            "dataset_name": str(card.get("name", "")), "dataset_digest": content_digest(card),
            "device": device_name(resolve_device(cfg.engine.device))}
    return run_tags(base | (extra or {}))


def log_artifacts(tracker: RunTracker, result: FitResult) -> None:
    """Per-class AP table (Parquet + CSV; AP in %), the per-image test scores (`comic.engine`) and the
    plots: mAP curves, shot groups, corrections, class distribution."""
    scores = result.workdir / TEST_SCORES if result.workdir is not None else None
    if scores is not None and scores.is_file():
        tracker.log_artifact(scores, SCORES_ARTIFACT_DIR)
    best = result.per_class.get("best")
    if best:  # AP in %, like every mAP the run logs
        tracker.log_table({k: [100.0 * v for v in vs] if k.endswith("_ap") else vs for k, vs in best.items()},
                          "per_class_ap")
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
