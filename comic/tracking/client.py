"""One MLflow run per `RunTracker`: created or reattached, logged to in batches, always closed with a final state.

Everything goes through `MlflowClient` with explicit run ids, never through MLflow's fluent active-run stack, because
Ray trials, threads and resumed processes each need to address their own run. Decisions the callers rely on:

- Metrics: one `(key, step)` point at most. Steps at or below the last step logged for a key are dropped, which
  makes a resumed run (same MLflow run, reattached by `run_id=`) free of duplicate points. Non-finite values are
  logged as they are (a NaN mAP or a diverging loss is information, and dropping it would be indistinguishable
  from a dropped duplicate); note that the SQLite store saves +-inf as +-1.8e308. A warning is logged once per key.
- Every batch is written synchronously (even with MLFLOW_ENABLE_ASYNC_LOGGING), and `MlflowClient.log_batch` splits
  it into MLflow's own chunk sizes: a checkpoint saved after `log_metrics` returns never runs ahead of MLflow, and a
  KILLED status never overtakes queued points.
- Params are shown, not computed with: floats are logged to PARAM_DIGITS significant digits (`2.488`, not
  `2.48815596...`; the exact values are in the run's config artifact).
- Params are immutable in MLflow: re-logging an identical value is skipped, a different value raises
  `ValueError` before anything is written. Log values that change during a run as tags or metrics.
- Run states: FINISHED on a normal exit of the `with` block, FAILED on an exception (tag `error` + `error.txt`
  with the traceback), KILLED on KeyboardInterrupt or SIGTERM (handler installed in the main thread only,
  chained to the previous one). A run still open when the interpreter exits is closed by `atexit`: FAILED if an
  uncaught exception ended the program, else KILLED (the owner never called `end()`). `detach()` leaves the
  run's final state to someone else (a Ray Tune trial stopped by Tune: the driver knows why it stopped).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from comic._io import GUARD as _GUARD
from comic._io import SigtermHandler
from comic.tracking.store import client, ensure_experiment, resolve_tracking_uri

logger = logging.getLogger(__name__)

# MLflow's limits on value lengths (mlflow.utils.validation, 3.17); longer values are cut with "...".
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000

PARAM_DIGITS = 4
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_TAG, RUN_NAME_TAG = "mlflow.parentRunId", "mlflow.runName"
ERROR_TAG = "error"
RESUME_TAG = "resume_count"
DATASET_ATTEMPTS = 3
DATASET_CONTEXT_TAG = "mlflow.data.context"  # what the UI shows beside a run's dataset ('train', 'eval')


def param_text(value: Any) -> str:
    """A param as the UI shows it: floats (also inside lists) to PARAM_DIGITS significant digits."""
    if isinstance(value, float):
        return repr(float(f"{value:.{PARAM_DIGITS}g}"))  # 6.0 stays "6.0", 2.48815 becomes "2.488"
    if isinstance(value, (list, tuple)) and any(isinstance(v, float) for v in value):
        return "[" + ", ".join(param_text(v) if isinstance(v, float) else repr(v) for v in value) + "]"
    return str(value)


def _same_param(old: str, text: str) -> bool:
    """Equal, or `old` is the full-precision form of the rounded `text` (a run logged before params were rounded)."""
    try:
        return old == text or param_text(float(old)) == text
    except ValueError:
        return False


def truncate(text: str, limit: int = MAX_TAG_VALUE_LENGTH) -> str:
    """`text` within MLflow's `limit` (a tag's by default), '...' marking a cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)


def _error_summary(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _to_arrow(data: Any) -> Any:
    """A pyarrow Table from a Table, a pandas DataFrame, a dict of columns or a sequence of row dicts."""
    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "columns") and hasattr(data, "to_dict"):
        return pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, Mapping):
        return pa.table({str(k): list(v) for k, v in data.items()})
    if isinstance(data, Sequence) and all(isinstance(row, Mapping) for row in data):
        return pa.Table.from_pylist([dict(row) for row in data])
    raise TypeError(f"log_table needs a DataFrame, a dict of columns or a list of row dicts, got {type(data)}")


class RunTracker:
    """One MLflow run: created fresh, or reattached with `run_id=` to resume it; a child when `parent_run_id` is set.

    Use as a context manager (`with RunTracker(uri, "study") as run:`) or call `start()` / `end()` yourself.
    `detach_on_exit=True`: a `SystemExit(0)` leaving the block detaches instead of ending the run FINISHED (Ray Tune
    stops a trial that way, whether ASHA stopped it or the sweep was interrupted; the driver settles the run).
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str | None,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        detach_on_exit: bool = False,
    ) -> None:
        if experiment is None and run_id is None:
            raise ValueError("RunTracker needs an experiment name for a new run (or run_id= to reattach)")
        self._uri = resolve_tracking_uri(uri)
        self._experiment = experiment
        self._run_name = run_name
        self._parent = parent_run_id
        self._run_id = run_id
        self._tags = dict(tags or {})
        self._detach_on_exit = detach_on_exit
        self._client: MlflowClient | None = None
        self._state = "new"  # new -> running -> ended
        self._params: dict[str, str] = {}
        self._last_steps: dict[str, int] = {}
        self._unchecked_keys: set[str] = set()  # keys present at reattach: last step fetched on first use
        self._nonfinite_warned: set[str] = set()
        self._sigterm: SigtermHandler | None = None

    # ---------------------------------------------------------------- properties

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            raise RuntimeError("the run has no id before start()")
        return self._run_id

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @property
    def active(self) -> bool:
        return self._state == "running"

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> RunTracker:
        """Create (or reattach to) the run and install the SIGTERM / atexit safety nets."""
        if self._state != "new":
            raise RuntimeError("a RunTracker starts once; make a new one with run_id= to continue a run")
        if "MLFLOW_RUN_ID" in os.environ:
            # A leaked MLFLOW_RUN_ID would make any fluent mlflow call below us log into a foreign run.
            logger.warning("ignoring and unsetting MLFLOW_RUN_ID=%s", os.environ.pop("MLFLOW_RUN_ID"))
        self._client = client(self._uri)
        if self._run_id is None:
            self._create()
        else:
            self._reattach()
        self._state = "running"
        atexit.register(self._at_exit)
        self._install_sigterm()
        return self

    def _create(self) -> None:
        assert self._client is not None and self._experiment is not None
        experiment_id = ensure_experiment(self._uri, self._experiment)
        tags = {key: truncate(str(value)) for key, value in self._tags.items()}
        if self._parent:
            tags[PARENT_TAG] = self._parent
        with _GUARD.call():
            run = self._client.create_run(experiment_id, tags=tags, run_name=self._run_name)
        self._run_id = run.info.run_id
        logger.info(
            "MLflow run %s (%s) in experiment %r at %s", self._run_id, run.info.run_name, self._experiment, self._uri
        )

    def _reattach(self) -> None:
        assert self._client is not None and self._run_id is not None
        try:
            run = self._client.get_run(self._run_id)
        except MlflowException as exc:
            raise ValueError(f"cannot reattach: run {self._run_id} not found at {self._uri} ({exc})") from exc
        if run.info.lifecycle_stage == "deleted":
            raise ValueError(f"cannot reattach: run {self._run_id} at {self._uri} is deleted")
        old_parent = run.data.tags.get(PARENT_TAG)
        if self._parent and old_parent != self._parent:
            logger.warning(
                "run %s has parent %s, not %s; keeping the original link", self._run_id, old_parent, self._parent
            )
        self._params = dict(run.data.params)
        self._unchecked_keys = set(run.data.metrics)
        tags = {**self._tags, RESUME_TAG: int(run.data.tags.get(RESUME_TAG, "0")) + 1}
        with _GUARD.call():
            if ERROR_TAG in run.data.tags:
                # Keep the earlier failure visible without making the resumed run look failed.
                tags[f"{ERROR_TAG}.previous"] = run.data.tags[ERROR_TAG]
                self._client.delete_tag(self._run_id, ERROR_TAG)
            self._client.update_run(self._run_id, status="RUNNING")
        self._log_tags(tags)
        logger.info("reattached to MLflow run %s (was %s, resume #%s)", self._run_id, run.info.status, tags[RESUME_TAG])

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Close the run with `status`; `error` goes to the `error` tag and to `error.txt`. A second call is a no-op."""
        self._finish(status, error, error)

    def _finish(self, status: str, summary: str | None, details: str | None) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        client = self._require_started()
        # Inside the guard a SIGTERM waits until the status is written, then reaches our (still installed) handler.
        with _GUARD.call():
            if self._state != "running":
                return
            self._state = "ended"
            try:
                self._record_error(summary, details)
                client.set_terminated(self.run_id, status=status)
            finally:
                atexit.unregister(self._at_exit)
                self._uninstall_sigterm()
        logger.info("MLflow run %s ended %s", self._run_id, status)

    def detach(self) -> None:
        """Stop tracking without writing a final state: someone else closes the run (a no-op unless running)."""
        if self._state == "running":
            self._state = "detached"
            atexit.unregister(self._at_exit)
            self._uninstall_sigterm()
            logger.info("MLflow run %s detached; its final state is left to the driver", self._run_id)

    def _record_error(self, summary: str | None, details: str | None) -> None:
        try:
            if summary:
                self._log_tags({ERROR_TAG: summary})
            if details:
                self.log_text(details, "error.txt")
        except Exception:  # the status written after this matters more than the error text
            logger.exception("could not record the error text of run %s", self._run_id)

    def __enter__(self) -> RunTracker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self._finish("FINISHED", None, None)
        elif isinstance(exc, KeyboardInterrupt):
            self._finish("KILLED", "KeyboardInterrupt", None)
        elif isinstance(exc, SystemExit) and exc.code in (0, None) and self._detach_on_exit:
            self.detach()
        elif isinstance(exc, SystemExit) and exc.code in (0, None):
            self._finish("FINISHED", None, None)
        else:
            self._finish("FAILED", _error_summary(exc), "".join(traceback.format_exception(exc_type, exc, tb)))

    def _at_exit(self) -> None:
        # sys.last_exc (3.12+) / sys.last_value is set when an uncaught exception ended the program.
        exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
        try:
            if exc is not None:
                details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                self._finish("FAILED", _error_summary(exc), details)
            else:
                self._finish("KILLED", "process exited without RunTracker.end()", None)
        except Exception:
            logger.exception("could not close MLflow run %s at exit", self._run_id)

    # ---------------------------------------------------------------- SIGTERM

    def _install_sigterm(self) -> None:
        self._sigterm = SigtermHandler(self._killed_by)
        self._sigterm.install()

    def _uninstall_sigterm(self) -> None:
        if self._sigterm is not None:
            self._sigterm.uninstall()

    def _killed_by(self, signum: int) -> None:
        self._finish("KILLED", f"terminated by {signal.Signals(signum).name}", None)

    # ---------------------------------------------------------------- logging

    def _require_started(self) -> MlflowClient:
        if self._client is None:
            raise RuntimeError("start() the RunTracker (or enter its `with` block) before logging")
        return self._client

    def log_params(self, flat: Mapping[str, Any]) -> int:
        """Log flat params (values stringified, truncated to MLflow's limit); returns how many were new."""
        mlflow_client = self._require_started()
        new: dict[str, str] = {}
        conflicts = []
        for key, value in flat.items():
            text = truncate(param_text(value), MAX_PARAM_VALUE_LENGTH)
            old = self._params.get(key)
            if old is None:
                new[key] = text
            elif not _same_param(old, text):
                conflicts.append(f"{key}: logged {old!r}, now {text!r}")
        if conflicts:
            raise ValueError(
                f"MLflow params are immutable and run {self._run_id} already holds different values: "
                f"{'; '.join(conflicts)}. Log changing values as tags or metrics, or start a new run."
            )
        if new:
            with _GUARD.call():
                mlflow_client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items()], synchronous=True)
            self._params.update(new)
        return len(new)

    def last_step(self, key: str) -> int | None:
        """The highest step logged for metric `key` in this run (including before a reattach), or None."""
        mlflow_client = self._require_started()
        if key in self._unchecked_keys:
            self._unchecked_keys.discard(key)
            with _GUARD.call():
                history = mlflow_client.get_metric_history(self.run_id, key)
            steps = [point.step for point in history]
            if key in self._last_steps:
                steps.append(self._last_steps[key])
            if steps:
                self._last_steps[key] = max(steps)
        return self._last_steps.get(key)

    def _as_float(self, key: str, value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metric {key!r} must be a number, got {value!r}") from exc
        if not math.isfinite(number) and key not in self._nonfinite_warned:
            self._nonfinite_warned.add(key)
            logger.warning("metric %r is %s (logged as is; further non-finite values of it not reported)", key, number)
        return number

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> int:
        """Log `metrics` at `step` in one batch; points at or below a key's last step are dropped.

        Returns the number of points written.
        """
        return self.log_steps([(step, metrics)])

    def log_steps(self, rows: Sequence[tuple[int, Mapping[str, Any]]]) -> int:
        """Log several steps' metrics (`(step, metrics)` in increasing step order) in one batch; points at or below a
        key's last step are dropped. Returns the number of points written."""
        mlflow_client = self._require_started()
        timestamp = _now_ms()
        points, offered, steps = [], 0, {}
        for step, metrics in rows:
            offered += len(metrics)
            for key, value in metrics.items():
                last = steps.get(key, self.last_step(key))
                if last is not None and int(step) <= last:
                    continue
                points.append(Metric(key, self._as_float(key, value), timestamp, int(step)))
                steps[key] = int(step)
        if points:
            with _GUARD.call():
                mlflow_client.log_batch(self.run_id, metrics=points, synchronous=True)
            self._last_steps.update(steps)
        if len(points) < offered:
            logger.debug("run %s: %d points already logged, skipped", self._run_id, offered - len(points))
        return len(points)

    def _log_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow_client = self._require_started()
        items = [RunTag(key, truncate(str(value))) for key, value in tags.items()]
        if items:
            with _GUARD.call():
                mlflow_client.log_batch(self.run_id, tags=items, synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags; values stringified and truncated to MLflow's limit."""
        self._log_tags(tags)

    # ---------------------------------------------------------------- artifacts

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under `artifact_path`."""
        mlflow_client = self._require_started()
        with _GUARD.call():
            if Path(path).is_dir():
                mlflow_client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                mlflow_client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, dataset: Dataset, context: str) -> None:
        """Record a dataset input of the run (the runs table's Dataset column); `context`: how the run used it."""
        mlflow_client = self._require_started()
        inputs = [DatasetInput(dataset, [InputTag(DATASET_CONTEXT_TAG, context)])]
        for attempt in range(DATASET_ATTEMPTS):
            try:
                with _GUARD.call():
                    mlflow_client.log_inputs(self.run_id, inputs)
                return
            except MlflowException as err:
                # Concurrent trials logging the same new dataset race to create its row: the loser's insert
                # violates the unique key; on the next attempt the row exists and only the link is added.
                if attempt + 1 == DATASET_ATTEMPTS:
                    raise
                logger.debug("logging dataset %s again after %s", dataset.name, err)

    def log_text(self, text: str, name: str) -> None:
        """Write `text` to the artifact file `name` (e.g. 'notes/summary.md')."""
        mlflow_client = self._require_started()
        with _GUARD.call():
            mlflow_client.log_text(self.run_id, text, name)

    def log_dict(self, obj: Mapping[str, Any], name: str) -> None:
        """Write `obj` as JSON or YAML (chosen by `name`'s suffix); non-JSON values (paths, numpy) are stringified."""
        mlflow_client = self._require_started()
        plain = json.loads(json.dumps(obj, default=str))
        with _GUARD.call():
            mlflow_client.log_dict(self.run_id, plain, name)

    def log_figure(self, fig: Figure, name: str) -> None:
        """Save a matplotlib figure as the artifact `name` (format from its suffix, e.g. 'plots/map.png')."""
        mlflow_client = self._require_started()
        with _GUARD.call():
            mlflow_client.log_figure(self.run_id, fig, name)

    def log_table(self, data: Any, name: str, artifact_path: str | None = "tables") -> None:
        """Write a table (DataFrame, dict of columns, row dicts) as `<name>.parquet` and `<name>.csv` artifacts."""
        table = _to_arrow(data)
        stem = Path(name).stem if Path(name).suffix in (".parquet", ".csv") else name
        with tempfile.TemporaryDirectory() as tmp:
            pq.write_table(table, Path(tmp) / f"{stem}.parquet")
            pa_csv.write_csv(table, Path(tmp) / f"{stem}.csv")
            self.log_artifact(tmp, artifact_path)
