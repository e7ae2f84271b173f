"""MLflow tracking for COMIC runs: tracking URI, experiments, one run per `RunTracker`, provenance tags.

`mlflow` is imported inside functions only, so `import comic.tracking` stays cheap and `import comic` never pulls
MLflow in. Everything goes through `MlflowClient` with explicit run ids, never through MLflow's fluent
active-run stack, because Ray trials, threads and resumed processes each need to address their own run.

Decisions the callers rely on:

- Tracking URI: explicit argument > `MLFLOW_TRACKING_URI` > `sqlite:///<abs cwd>/mlruns/mlflow.db`, always made
  absolute because Ray Tune changes each trial's working directory. Plain folders / `file:` URIs are refused
  (MLflow 3.17 refuses them too) unless `MLFLOW_ALLOW_FILE_STORE=true`.
- Experiments are created by the driver (`ensure_experiment`) before trials start: two processes creating a
  fresh SQLite database at once race in MLflow's schema migration. For SQLite stores the artifacts live next to
  the database (`<db folder>/artifacts/<experiment>`), not in whatever directory happened to be current.
- Metrics: one `(key, step)` point at most. Steps at or below the last step logged for a key are dropped, which
  makes a resumed run (same MLflow run, reattached by `run_id=`) free of duplicate points. Non-finite values are
  logged as they are (a NaN mAP or a diverging loss is information, and dropping it would be indistinguishable
  from a dropped duplicate); note that the SQLite store saves +-inf as +-1.8e308. A warning is logged once per key.
- Every batch is written synchronously (even with MLFLOW_ENABLE_ASYNC_LOGGING): a checkpoint saved after
  `log_metrics` returns never runs ahead of MLflow, and a KILLED status never overtakes queued points.
- Params are immutable in MLflow: re-logging an identical value is skipped, a different value raises
  `ValueError` before anything is written. Log values that change during a run as tags or metrics.
- Run states: FINISHED on a normal exit of the `with` block, FAILED on an exception (tag `error` + `error.txt`
  with the traceback), KILLED on KeyboardInterrupt or SIGTERM (handler installed in the main thread only,
  chained to the previous one). A run still open when the interpreter exits is closed by `atexit`: FAILED if an
  uncaught exception ended the program, else KILLED (the owner never called `end()`).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

# Limits of MLflow's log_batch and value lengths (mlflow.utils.validation, 3.17).
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_TAG = "mlflow.parentRunId"
ERROR_TAG = "error"
RESUME_TAG = "resume_count"
DEFAULT_DB = Path("mlruns") / "mlflow.db"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_VERSIONED = {"comic": "comic-lab", "torch": "torch", "ray": "ray", "mlflow": "mlflow", "optuna": "optuna"}


# --------------------------------------------------------------------------------------------- tracking URI


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The absolute tracking URI to use: `uri` > env `MLFLOW_TRACKING_URI` > `sqlite:///<abs cwd>/mlruns/mlflow.db`.

    Relative SQLite paths are made absolute (and their folder created); http(s) and other database URIs pass
    through unchanged. A plain folder or `file:` URI raises `ValueError` unless `MLFLOW_ALLOW_FILE_STORE=true`.
    """
    chosen = (uri or os.environ.get("MLFLOW_TRACKING_URI") or "").strip()
    if not chosen:
        db = Path.cwd() / DEFAULT_DB
        db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{db}"
    scheme = urlparse(chosen).scheme.lower()
    if chosen == "databricks":  # MLflow's one scheme-less URI that is not a folder
        return chosen
    if scheme == "sqlite":
        return _absolute_sqlite(chosen)
    if scheme in ("", "file"):
        return _file_store(chosen)
    return chosen


def _absolute_sqlite(uri: str) -> str:
    path_part, sep, query = uri[len("sqlite://") :].partition("?")
    if path_part in ("", "/", "/:memory:"):
        raise ValueError(
            f"tracking URI {uri!r} is an in-memory SQLite database, which other processes (Ray trials, the MLflow "
            "UI) cannot see; give a file, e.g. 'sqlite:///mlruns/mlflow.db'"
        )
    # sqlite:///rel.db has path_part '/rel.db'; sqlite:////abs.db has '//abs.db': drop the authority slash.
    path = Path(os.path.abspath(Path(path_part[1:]).expanduser()))
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}{sep}{query}"


def _file_store(uri: str) -> str:
    folder = unquote(urlparse(uri).path) if uri.startswith("file:") else uri
    folder_path = Path(os.path.abspath(Path(folder).expanduser()))
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("1", "true", "yes"):
        return folder_path.as_uri()
    raise ValueError(
        f"MLflow tracking URI {uri!r} is a plain folder (MLflow's file store). MLflow 3.17 refuses it ('The "
        "filesystem tracking backend ... is in maintenance mode') unless MLFLOW_ALLOW_FILE_STORE=true is set. "
        f"Use a SQLite database instead, e.g. 'sqlite:///{folder_path / 'mlflow.db'}', or an http(s) MLflow "
        "server; an existing folder store converts with `mlflow migrate-filestore`."
    )


# --------------------------------------------------------------------------------------------- experiments


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str, name: str) -> str | None:
    """Artifacts of a SQLite store go beside the database; servers and other databases choose their own."""
    if not uri.startswith("sqlite:"):
        return None
    db = Path(uri[len("sqlite:///") :].partition("?")[0])
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._") or "experiment"
    return (db.parent / "artifacts" / slug).as_uri()


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing. Call it from the driver before any trial starts."""
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(uri)
    client = _client(uri)
    existing = client.get_experiment_by_name(name)
    if existing is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException:
            # Another process created it between our lookup and our create.
            existing = client.get_experiment_by_name(name)
            if existing is None:
                raise
    if existing.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} (id {existing.experiment_id}) at {uri} is deleted; restore it "
            "(`mlflow experiments restore`), purge it (`mlflow gc`), or choose another name"
        )
    return existing.experiment_id


# --------------------------------------------------------------------------------------------- helpers


class _CallGuard:
    """Counts MLflow calls in progress in the main thread; a SIGTERM arriving during one waits for its end.

    The signal handler runs in the main thread between bytecodes, possibly inside an open SQLite write
    transaction of that same thread; writing the KILLED status from the handler then would wait on our own lock.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.deferred: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        main = threading.current_thread() is threading.main_thread()
        if main:
            self.depth += 1
        try:
            yield
        finally:
            if main:
                self.depth -= 1
                while self.depth == 0 and self.deferred:
                    self.deferred.pop(0)()


_GUARD = _CallGuard()


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)


def _error_summary(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _to_arrow(data: Any) -> Any:
    """A pyarrow Table from a Table, a pandas DataFrame, a dict of columns or a sequence of row dicts."""
    import pyarrow as pa

    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "columns") and hasattr(data, "to_dict"):
        return pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, Mapping):
        return pa.table({str(k): list(v) for k, v in data.items()})
    if isinstance(data, Sequence) and all(isinstance(row, Mapping) for row in data):
        return pa.Table.from_pylist([dict(row) for row in data])
    raise TypeError(f"log_table needs a DataFrame, a dict of columns or a list of row dicts, got {type(data)}")


# --------------------------------------------------------------------------------------------- the run


class RunTracker:
    """One MLflow run: created fresh, or reattached with `run_id=` to resume it; a child when `parent_run_id` is set.

    Use as a context manager (`with RunTracker(uri, "study") as run:`) or call `start()` / `end()` yourself.
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str | None,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        if experiment is None and run_id is None:
            raise ValueError("RunTracker needs an experiment name for a new run (or run_id= to reattach)")
        self._uri = resolve_tracking_uri(uri)
        self._experiment = experiment
        self._run_name = run_name
        self._parent = parent_run_id
        self._run_id = run_id
        self._tags = dict(tags or {})
        self._client: MlflowClient | None = None
        self._state = "new"  # new -> running -> ended
        self._params: dict[str, str] = {}
        self._last_steps: dict[str, int] = {}
        self._unchecked_keys: set[str] = set()  # keys present at reattach: last step fetched on first use
        self._nonfinite_warned: set[str] = set()
        self._previous_sigterm: Any = None
        self._sigterm_installed = False

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
        self._client = _client(self._uri)
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
        tags = {key: _truncate(str(value), MAX_TAG_VALUE_LENGTH) for key, value in self._tags.items()}
        if self._parent:
            tags[PARENT_TAG] = self._parent
        with _GUARD.call():
            run = self._client.create_run(experiment_id, tags=tags, run_name=self._run_name)
        self._run_id = run.info.run_id
        logger.info(
            "MLflow run %s (%s) in experiment %r at %s", self._run_id, run.info.run_name, self._experiment, self._uri
        )

    def _reattach(self) -> None:
        from mlflow.exceptions import MlflowException

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
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a Ray trial thread cannot install one
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_IGN:
            return  # a process that ignores SIGTERM keeps running, so the run is not over
        self._previous_sigterm = previous
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True

    def _uninstall_sigterm(self) -> None:
        if not self._sigterm_installed or threading.current_thread() is not threading.main_thread():
            return  # if not restored, our handler stays but only chains once the run has ended
        self._sigterm_installed = False
        # Restore only if ours is still on top; otherwise a later handler chains to ours, which passes it on.
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if _GUARD.depth:
            _GUARD.deferred.append(lambda: self._handle_sigterm(signum, None))
        else:
            self._handle_sigterm(signum, frame)

    def _handle_sigterm(self, signum: int, frame: FrameType | None) -> None:
        try:
            self._finish("KILLED", f"terminated by {signal.Signals(signum).name}", None)
        except Exception:
            logger.exception("could not mark MLflow run %s KILLED", self._run_id)
        previous = self._previous_sigterm
        if callable(previous):
            previous(signum, frame)
            return
        # SIG_DFL (or a handler installed from C): let the default action end the process, as it would without us.
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    # ---------------------------------------------------------------- logging

    def _require_started(self) -> MlflowClient:
        if self._client is None:
            raise RuntimeError("start() the RunTracker (or enter its `with` block) before logging")
        return self._client

    def log_params(self, flat: Mapping[str, Any]) -> int:
        """Log flat params (values stringified, truncated to MLflow's limit); returns how many were new."""
        from mlflow.entities import Param

        client = self._require_started()
        new: dict[str, str] = {}
        conflicts = []
        for key, value in flat.items():
            text = _truncate(str(value), MAX_PARAM_VALUE_LENGTH)
            old = self._params.get(key)
            if old is None:
                new[key] = text
            elif old != text:
                conflicts.append(f"{key}: logged {old!r}, now {text!r}")
        if conflicts:
            raise ValueError(
                f"MLflow params are immutable and run {self._run_id} already holds different values: "
                f"{'; '.join(conflicts)}. Log changing values as tags or metrics, or start a new run."
            )
        for chunk in _chunks(list(new.items()), MAX_PARAMS_PER_BATCH):
            with _GUARD.call():
                client.log_batch(self.run_id, params=[Param(key, text) for key, text in chunk], synchronous=True)
            self._params.update(chunk)
        return len(new)

    def last_step(self, key: str) -> int | None:
        """The highest step logged for metric `key` in this run (including before a reattach), or None."""
        client = self._require_started()
        if key in self._unchecked_keys:
            self._unchecked_keys.discard(key)
            with _GUARD.call():
                history = client.get_metric_history(self.run_id, key)
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
        """Log `metrics` at `step` in batches of <= 1000; points at or below a key's last step are dropped.

        Returns the number of points written.
        """
        from mlflow.entities import Metric

        client = self._require_started()
        step = int(step)
        timestamp = _now_ms()
        points = []
        for key, value in metrics.items():
            last = self.last_step(key)
            if last is not None and step <= last:
                continue
            points.append(Metric(key, self._as_float(key, value), timestamp, step))
        for chunk in _chunks(points, MAX_METRICS_PER_BATCH):
            with _GUARD.call():
                client.log_batch(self.run_id, metrics=list(chunk), synchronous=True)
            self._last_steps.update((point.key, step) for point in chunk)
        if len(points) < len(metrics):
            logger.debug(
                "run %s step %d: %d points already logged, skipped", self._run_id, step, len(metrics) - len(points)
            )
        return len(points)

    def _log_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        client = self._require_started()
        items = [(key, _truncate(str(value), MAX_TAG_VALUE_LENGTH)) for key, value in tags.items()]
        for chunk in _chunks(items, MAX_TAGS_PER_BATCH):
            with _GUARD.call():
                client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in chunk], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags; values stringified and truncated to MLflow's limit."""
        self._log_tags(tags)

    # ---------------------------------------------------------------- artifacts

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under `artifact_path`."""
        client = self._require_started()
        with _GUARD.call():
            if Path(path).is_dir():
                client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        """Write `text` to the artifact file `name` (e.g. 'notes/summary.md')."""
        client = self._require_started()
        with _GUARD.call():
            client.log_text(self.run_id, text, name)

    def log_dict(self, obj: Mapping[str, Any], name: str) -> None:
        """Write `obj` as JSON or YAML (chosen by `name`'s suffix); non-JSON values (paths, numpy) are stringified."""
        client = self._require_started()
        plain = json.loads(json.dumps(obj, default=str))
        with _GUARD.call():
            client.log_dict(self.run_id, plain, name)

    def log_figure(self, fig: Figure, name: str) -> None:
        """Save a matplotlib figure as the artifact `name` (format from its suffix, e.g. 'plots/map.png')."""
        client = self._require_started()
        with _GUARD.call():
            client.log_figure(self.run_id, fig, name)

    def log_table(self, data: Any, name: str, artifact_path: str | None = "tables") -> None:
        """Write a table (DataFrame, dict of columns, row dicts) as `<name>.parquet` and `<name>.csv` artifacts."""
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq

        table = _to_arrow(data)
        stem = Path(name).stem if Path(name).suffix in (".parquet", ".csv") else name
        with tempfile.TemporaryDirectory() as tmp:
            pq.write_table(table, Path(tmp) / f"{stem}.parquet")
            pa_csv.write_csv(table, Path(tmp) / f"{stem}.csv")
            self.log_artifact(tmp, artifact_path)


# --------------------------------------------------------------------------------------------- provenance


def git(*args: str) -> str:
    """stdout of `git <args>` run in the checkout holding this package (raises OSError / SubprocessError)."""
    done = subprocess.run(
        ["git", "-C", str(_PACKAGE_ROOT), *args], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository holding this package; (None, None) without git or outside a checkout."""
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != _PACKAGE_ROOT:
            return None, None  # installed inside some other repository (e.g. a venv in a checkout)
        commit = git("rev-parse", "HEAD")
        # Untracked files (outputs, caches) do not make the code dirty.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def run_tags(extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Provenance tags for a run: git commit / dirty flag, package versions, host; `extra` (device name, dataset
    card hash, ...) is merged last. Never imports the packages it reports on."""
    tags = {"host": socket.gethostname(), "version.python": platform.python_version()}
    tags.update({f"version.{label}": _version(dist) for label, dist in _VERSIONED.items()})
    commit, dirty = _git_state()
    if commit is None:
        tags["git.commit"] = "unknown"
    else:
        tags.update({"git.commit": commit, "git.dirty": str(dirty).lower(), "mlflow.source.git.commit": commit})
    tags.update({key: str(value) for key, value in (extra or {}).items()})
    return tags
