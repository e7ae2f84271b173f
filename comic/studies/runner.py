"""Running an ablation study: its cells (`comic.studies.plan`) as resumable runs, their results on disk and in MLflow.

`StudyRun` keeps the outcomes in `<study dir>/cells.parquet` (one row per cell: arm, variant, benchmark, seed, key,
MLflow run id, state, wall time, every final metric) and per-epoch curves in `curves.parquet`. A rerun skips
finished cells, resumes unfinished ones (each cell trains in `<study dir>/cells/<key>`, whose checkpoint and MLflow
run id `comic.tracking.run.tracked_fit` picks up) and reruns failed ones.

MLflow: one experiment per study (default `ablation-<name>`), one parent run per plan (the set of cell keys; an
identical rerun reattaches to it), and one child run per cell, linked by `mlflow.parentRunId` and tagged with
`ablation.cell`, `ablation.arm` and `group_key` (the arm) for grouping in the UI.

Backends: `local` runs the cells one after another in this process (no Ray); `ray` hands them to
`comic.tuning.runner.run_configs` as one Tune grid without early stopping.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from comic._io import atomic_write, atomic_write_text, stable_hash
from comic.config import Config, absolute_paths, identity, identity_hash
from comic.data.build import ensure_benchmark
from comic.engine import SCORES_ARTIFACT_DIR, TEST_SCORES, BestTestScores, read_test_scores
from comic.progress import progress as progress_bar
from comic.studies.plan import Cell, Study, plan
from comic.tracking import store
from comic.tracking.client import ERROR_TAG, PARENT_TAG, RunTracker
from comic.tracking.model import tracking
from comic.tracking.provenance import code_version, command_line, run_tags
from comic.tracking.run import RUN_ID_FILE, log_benchmark, tracked_fit
from comic.tracking.store import NOTE_TAG, LogTarget, ensure_experiment, run_link, search_all_runs
from comic.tuning.cluster import Resources
from comic.tuning.runner import run_configs

log = logging.getLogger(__name__)

CELLS_FILE, CURVES_FILE, PARENTS_FILE, SCORES_DIR = "cells.parquet", "curves.parquet", "parents.json", "scores"
FINISHED, FAILED, PENDING = "finished", "failed", "pending"
BACKENDS = ("local", "ray")
# Per-epoch metrics kept for figures over training (Fig. 6): balanced / head / tail models, shot groups, loss.
# Validation curves: the test set is evaluated only at the epochs where val/map improves (unless asked otherwise).
CURVE_KEYS = ("val/map", "val/map_many", "val/map_medium", "val/map_few", "val/head/map", "val/tail/map",
              "best/test/map", "train/loss")
OnCell = Callable[[Cell, dict[str, Any]], None]


# --------------------------------------------------------------------------------------------- the store


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Atomic: a crash mid-write never leaves a truncated results file."""
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


class CellStore:
    """The study's results on disk: one row per cell key (`cells.parquet`) and its curves (`curves.parquet`)."""

    def __init__(self, study_dir: Path) -> None:
        self.dir = study_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        cells, curves = self.dir / CELLS_FILE, self.dir / CURVES_FILE
        frame = pd.read_parquet(cells) if cells.is_file() else pd.DataFrame()
        self.rows: dict[str, dict[str, Any]] = {r["key"]: r for r in frame.to_dict("records")}
        self.curves = pd.read_parquet(curves) if curves.is_file() else pd.DataFrame(
            columns=["key", "epoch", "metric", "value"])

    def state(self, key: str) -> str:
        return str(self.rows.get(key, {}).get("state", PENDING))

    def put(self, row: dict[str, Any], history: Sequence[Mapping[str, float]] = ()) -> None:
        self.rows[row["key"]] = row
        if history:
            points = [{"key": row["key"], "epoch": int(h["epoch"]), "metric": k, "value": float(h[k])}
                      for h in history for k in CURVE_KEYS if k in h]
            kept = self.curves[self.curves["key"] != row["key"]]
            self.curves = pd.concat([kept, pd.DataFrame(points)], ignore_index=True) if len(kept) else \
                pd.DataFrame(points)
            _write_parquet(self.curves, self.dir / CURVES_FILE)
        _write_parquet(pd.DataFrame(list(self.rows.values())), self.dir / CELLS_FILE)


# --------------------------------------------------------------------------------------------- running a study


class StudyRun:
    """A study's cells and its parent MLflow run, open inside `with`: `run()` the pending cells, read `rows()`,
    `publish()` the tables and figures to the study directory and the parent run."""

    def __init__(self, study: Study, base: Config, *, study_dir: str | Path, tracking_uri: str | None = None,
                 experiment: str | None = None, code: str | None = None, title: str | None = None,
                 label: str = "", log_models: bool = False, parent_run_id: str | None = None) -> None:
        self.study = study
        self.log_models = log_models  # each cell logs its best-on-val model (off by default: one per cell is waste)
        self.title = title or f"ablation study {study.name}"
        self.label = label  # what sets this plan apart from its siblings in the runs table (preset, overrides)
        self.dir = Path(study_dir).expanduser().resolve()
        self.code = code or code_version()
        self.cells = plan(study, absolute_paths(base), self.code)
        self.log_to = LogTarget.at(tracking_uri, experiment or f"ablation-{study.name}", parent_run_id)
        self.store = CellStore(self.dir)
        self.parent: RunTracker | None = None
        self.experiment_id = ""
        self.executed: list[str] = []

    @property
    def tracking_uri(self) -> str:
        return self.log_to.tracking_uri

    @property
    def experiment(self) -> str:
        return self.log_to.experiment

    @property
    def plan_hash(self) -> str:
        return stable_hash(sorted(c.key for c in self.cells))

    def pending(self) -> list[Cell]:
        """Cells to run, one per key: never run, failed, or interrupted (they resume from their checkpoint)."""
        seen: set[str] = set()
        out = []
        for cell in self.cells:
            if cell.key not in seen and self.store.state(cell.key) != FINISHED:
                out.append(cell)
            seen.add(cell.key)
        return out

    def __enter__(self) -> StudyRun:
        self.experiment_id = ensure_experiment(self.tracking_uri, self.experiment, self._experiment_note())
        parents_file = self.dir / PARENTS_FILE
        parents = json.loads(parents_file.read_text()) if parents_file.is_file() else {}
        tags = run_tags({"ablation.study": self.study.name, "ablation.role": "study", "code_version": self.code,
                         NOTE_TAG: self._parent_note()})
        name = " · ".join(filter(None, (self.study.name, self.label))) + f" ({len(self.cells)} cells)"
        tracker = RunTracker(self.tracking_uri, self.experiment, run_name=name, run_id=parents.get(self.plan_hash),
                             tags=tags, parent_run_id=self.log_to.parent_run_id or None)
        try:
            tracker.start()
        except ValueError as err:  # the stored parent lives in another tracking store: start a new one
            log.warning("%s; starting a new parent run", err)
            tracker = RunTracker(self.tracking_uri, self.experiment, run_name=name, tags=tags,
                                 parent_run_id=self.log_to.parent_run_id or None).start()
        self.parent = tracker
        parents[self.plan_hash] = tracker.run_id
        atomic_write_text(parents_file, json.dumps(parents, indent=1))
        try:
            self._log_plan()
        except BaseException as err:  # `with` never reaches __exit__ when __enter__ raises: close the run here
            tracker.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def _experiment_note(self) -> str:
        # A code span: MLflow renders the description as Markdown, where a bare <arm> reads as an HTML tag.
        return (f"{self.title}. One parent run per plan (the tables, the figure and "
                "`agg/<arm>/<metric>/mean|std|n`), with a nested child run per (arm, seed) cell (tags ablation.arm, "
                "seed; per-epoch val/, test/, train/ curves). Expand a parent row in the runs table to see its cells; "
                "group by the arm tag to compare.")

    def _parent_note(self) -> str:
        arms = ", ".join(a.name for a in self.study.arms())
        return (f"{self.title}: arms {arms}; seeds {list(self.study.seeds)}; {len(self.cells)} cells. Results and "
                f"report: {self.dir}. Made by: `{command_line()}`")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.parent is not None:
            self.parent.__exit__(exc_type, exc, tb)

    def _log_plan(self) -> None:
        assert self.parent is not None
        base = {k: v for k, v in identity(self.cells[0].config).items() if k != "seed"}
        self.parent.log_params({"study": self.study.name, "seeds": list(self.study.seeds), "folds": self.study.folds,
                                "arms": [a.name for a in self.study.arms()], "plan_hash": self.plan_hash})
        self.parent.log_dict({"study": self.study.name, "seeds": list(self.study.seeds),
                              "variants": dict(self.study.variants), "benchmarks": dict(self.study.benchmarks),
                              "reference": self.study.reference, "folds": self.study.folds, "first_arm_config": base,
                              "cells": [{"arm": c.arm.name, "fold": c.fold, "seed": c.seed, "key": c.key}
                                        for c in self.cells]},
                             "study.json")
        for data in {c.dataset: c.config.data for c in self.cells}.values():  # each distinct benchmark once
            log_benchmark(self.parent, ensure_benchmark(data))

    # ----------------------------------------------------------------- execution

    def run(self, backend: str = "local", *, resources: Resources | None = None, max_failures: int = 1,
            shared_storage: bool = False, on_cell: OnCell | None = None, progress: bool = True) -> pd.DataFrame:
        """Run the pending cells on `backend` and return `rows()`. A failing cell is recorded (state 'failed',
        its error) and the grid goes on; an exception from `on_cell` (called after each cell is saved) stops it.

        `resources` (per cell), `max_failures` (Tune restarts of a crashed cell from its last
        epoch) and `shared_storage` (the study directory is on storage every Ray node mounts) concern `ray` only.
        """
        if self.parent is None:
            raise RuntimeError("use StudyRun inside `with`: the parent MLflow run must be open")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: must be one of {', '.join(BACKENDS)} (--backend)")
        todo = self.pending()
        log.info("study %s: %d cells, %d to run (%d finished earlier)", self.study.name, len(self.cells), len(todo),
                 len({c.key for c in self.cells}) - len(todo))
        if todo and backend == "local":
            self._run_local(todo, on_cell, progress)
        elif todo:
            self._run_ray(todo, resources, max_failures, shared_storage, on_cell)
        return self.rows()

    def _child_tags(self, cell: Cell) -> dict[str, str]:
        folds = {"ablation.fold": str(cell.fold), "ablation.folds": str(self.study.folds)} if self.study.folds else {}
        return {"ablation.study": self.study.name, "ablation.cell": cell.key, "ablation.arm": cell.arm.name,
                "ablation.variant": cell.arm.variant, "ablation.benchmark": cell.arm.benchmark,
                "group_key": cell.arm.name, "code_version": self.code, "dataset_digest": cell.dataset} | folds

    def _run_name(self, cell: Cell) -> str:
        fold = f" fold={cell.fold}" if self.study.folds else ""
        return f"{cell.arm.name}{fold} seed={cell.seed}"

    def _run_local(self, cells: list[Cell], on_cell: OnCell | None, progress: bool) -> None:
        for cell in progress_bar(cells, desc=f"{self.study.name} cells", unit="cell", enabled=progress):
            row, history = self._fit_local(cell)
            self._record(cell, row, history, on_cell)

    def _fit_local(self, cell: Cell) -> tuple[dict[str, Any], list[dict[str, float]]]:
        assert self.parent is not None
        workdir = self.dir / "cells" / cell.key
        start = time.perf_counter()
        try:
            result, run_id = tracked_fit(cell.config, tracking_uri=self.tracking_uri, experiment=self.experiment,
                                         workdir=workdir, run_name=self._run_name(cell),
                                         parent_run_id=self.parent.run_id, tags=self._child_tags(cell),
                                         log_model=self.log_models)
        except Exception as err:  # one broken cell must not sink the grid; it is rerun next time
            log.warning("cell %s (%s) failed: %s", cell.key, self._run_name(cell), err)
            id_file = workdir / RUN_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else ""
            return self._row(cell, FAILED, run_id, {}, f"{type(err).__name__}: {err}", _since(start)), []
        return self._row(cell, FINISHED, run_id, result.metrics, "", _since(start)), result.history

    def _run_ray(self, cells: list[Cell], resources: Resources | None, max_failures: int, shared_storage: bool,
                 on_cell: OnCell | None) -> None:
        assert self.parent is not None
        # The Tune experiment is named by the cells it holds: resubmitting the same pending set (after a driver
        # crash or Ctrl-C) restores that experiment, whose trials resume from their Tune checkpoints. A cell that
        # failed for good is retried in a new experiment, from scratch.
        name = f"{self.study.name}-{stable_hash([c.key for c in cells], 8)}"
        start = time.perf_counter()
        results = run_configs([c.config for c in cells], names=[self._run_name(c) for c in cells],
                              storage_path=str(self.dir / "ray"), name=name,
                              log_to=self.log_to.under(self.parent.run_id), resources=resources or Resources(),
                              max_failures=max_failures, resume=True,
                              tags=[self._child_tags(c) for c in cells], shared_storage=shared_storage,
                              log_models=self.log_models)
        runs = self._child_runs()
        for cell, metrics in zip(cells, results, strict=True):
            state = FINISHED if metrics else FAILED
            run = runs.get(cell.key)
            run_id = run.info.run_id if run else ""
            error = "" if metrics else self._trial_error(run_id)
            row = self._row(cell, state, run_id, metrics, error, _run_seconds(run) if run else _since(start))
            self._record(cell, row, self._history_from_mlflow(run_id) if metrics else [], on_cell)

    def _trial_error(self, run_id: str) -> str:
        """What ended a failed Ray cell: its MLflow run's error tag (the exception's last line), else where to look."""
        text = ""
        if run_id:
            text = store.client(self.tracking_uri).get_run(run_id).data.tags.get(ERROR_TAG, "")
        return text or f"the Ray trial failed (see the Tune experiment folder under {self.dir / 'ray'})"

    def _child_runs(self) -> dict[str, Run]:
        """cell key -> the MLflow run of the parent's children (the newest run of a key wins)."""
        assert self.parent is not None
        runs = search_all_runs(store.client(self.tracking_uri), [self.experiment_id],
                               f"tags.`{PARENT_TAG}` = '{self.parent.run_id}'",
                               order_by=["attributes.start_time ASC"])
        return {r.data.tags["ablation.cell"]: r for r in runs if "ablation.cell" in r.data.tags}

    def _history_from_mlflow(self, run_id: str) -> list[dict[str, float]]:
        client = store.client(self.tracking_uri)
        epochs: dict[int, dict[str, float]] = {}
        for key in CURVE_KEYS:
            for point in client.get_metric_history(run_id, key):
                epochs.setdefault(point.step, {"epoch": float(point.step)})[key] = point.value
        return [epochs[e] for e in sorted(epochs)]

    def _row(self, cell: Cell, state: str, run_id: str, metrics: Mapping[str, float], error: str,
             wall_s: float) -> dict[str, Any]:
        row = {"key": cell.key, "study": self.study.name, "arm": cell.arm.name, "variant": cell.arm.variant,
               "benchmark": cell.arm.benchmark, "fold": cell.fold, "seed": cell.seed, "state": state,
               "run_id": run_id, "error": error,
               "wall_s": wall_s, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "code_version": self.code, "dataset_digest": cell.dataset, "identity": identity_hash(cell.config)}
        return row | {k: float(v) for k, v in metrics.items()}

    def _record(self, cell: Cell, row: dict[str, Any], history: Sequence[Mapping[str, float]],
                on_cell: OnCell | None) -> None:
        self.store.put(row, history)
        self.executed.append(cell.key)
        if on_cell is not None:
            on_cell(cell, row)

    # ----------------------------------------------------------------- results

    def rows(self) -> pd.DataFrame:
        """One row per planned (arm, seed): the plan's labels, the cell's stored outcome and a link to its run."""
        out = []
        for cell in self.cells:
            stored = dict(self.store.rows.get(cell.key, {"state": PENDING, "run_id": ""}))
            stored |= {"key": cell.key, "arm": cell.arm.name, "variant": cell.arm.variant,
                       "benchmark": cell.arm.benchmark, "fold": cell.fold, "seed": cell.seed}
            run_id = stored.get("run_id") or ""
            stored["run_link"] = run_link(self.tracking_uri, self.experiment_id, run_id) if isinstance(
                run_id, str) else ""
            out.append(stored)
        return pd.DataFrame(out)

    def test_scores(self) -> dict[str, BestTestScores]:
        """cell key -> the per-image test scores of every finished cell that has them (`comic.engine`): the
        study's own copy `scores/<key>.npz`, else the cell's work directory (backend local) or its MLflow run's
        artifact (backend ray), copied into the study once. A cell without them (an older version's) is left out."""
        out = {}
        for key, row in self.store.rows.items():
            if row.get("state") != FINISHED:
                continue
            path = self.dir / SCORES_DIR / f"{key}.npz"
            if not path.is_file() and not self._fetch_scores(key, str(row.get("run_id") or ""), path):
                continue
            out[key] = read_test_scores(path)
        return out

    def _fetch_scores(self, key: str, run_id: str, path: Path) -> bool:
        local = self.dir / "cells" / key / TEST_SCORES
        if local.is_file():
            atomic_write(path, lambda tmp: shutil.copyfile(local, tmp))
            return True
        try:
            with tempfile.TemporaryDirectory() as tmp, tracking(self.tracking_uri):  # no download progress bars
                got = mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=tmp,
                                                          artifact_path=f"{SCORES_ARTIFACT_DIR}/{TEST_SCORES}")
                atomic_write(path, lambda dst: shutil.copyfile(got, dst))
            return True
        except (MlflowException, OSError) as err:
            log.warning("cell %s: no test scores (%s); it is left out of the test-image statistics", key, err)
            return False

    def curves(self) -> pd.DataFrame:
        """Per-epoch curves (key, epoch, metric, value) joined with the plan's arm and seed."""
        plan_frame = pd.DataFrame([{"key": c.key, "arm": c.arm.name, "seed": c.seed} for c in self.cells])
        return self.store.curves.merge(plan_frame, on="key", how="inner")

    def publish(self, texts: Mapping[str, str], tables: Mapping[str, pd.DataFrame], figures: Mapping[str, Any],
                metrics: Mapping[str, float] | None = None) -> list[Path]:
        """Write texts / tables (Parquet + CSV) / figures (PNG) into `<study dir>/report/` and log them to the
        parent run; `metrics` (e.g. per-arm means) are logged on the parent so the MLflow UI can sort on them."""
        assert self.parent is not None
        folder = self.dir / "report"
        folder.mkdir(exist_ok=True)
        written = []
        for name, text in texts.items():
            atomic_write_text(folder / name, text)
            self.parent.log_text(text, f"report/{name}")
            written.append(folder / name)
        for name, frame in tables.items():
            atomic_write(folder / f"{name}.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
            self.parent.log_table(frame, name, artifact_path="report")
            written.append(folder / f"{name}.csv")
        for name, fig in figures.items():
            atomic_write(folder / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png"))
            self.parent.log_figure(fig, f"report/{name}")
            written.append(folder / name)
        finite = {k: v for k, v in (metrics or {}).items() if math.isfinite(v)}
        if finite:  # step = finished cells, so a rerun that completes more cells adds a point
            done = sum(self.store.state(k) == FINISHED for k in {c.key for c in self.cells})
            self.parent.log_metrics(finite, step=done)
        return written


def _since(start: float) -> float:
    return time.perf_counter() - start


def _run_seconds(run: Run) -> float:
    """A Ray cell's own wall time: its MLflow run's start to end (the trials of a grid overlap)."""
    end = run.info.end_time or time.time() * 1000
    return (end - run.info.start_time) / 1000
