"""Where MLflow records go: the tracking URI (always absolute) and the experiments (created by the driver).

Decisions the callers rely on:
- Tracking URI: explicit argument > `MLFLOW_TRACKING_URI` > `sqlite:///<abs cwd>/mlruns/mlflow.db`, always made
  absolute because Ray Tune changes each trial's working directory. Plain folders / `file:` URIs are refused
  (MLflow 3.17 refuses them too) unless `MLFLOW_ALLOW_FILE_STORE=true`.
- Experiments are created by the driver (`ensure_experiment`) before trials start: two processes creating a
  fresh SQLite database at once race in MLflow's schema migration. For SQLite stores the artifacts live next to
  the database (`<db folder>/artifacts/<experiment>`), not in whatever directory happened to be current.
- Every experiment is tagged `mlflow.experimentKind = custom_model_development` (MLflow 3's mark of a model-training
  experiment) and gets a description (`mlflow.note.content`, shown on its page). MLflow 3.17's UI still opens
  experiments on its GenAI pages unless the browser's workflow switch says "Model training": the links made here
  (`experiment_link`, `run_link`) set it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from comic._io import file_lock
from comic.tracking.provenance import executable

DEFAULT_DB = Path("mlruns") / "mlflow.db"
EXPERIMENT_KIND_TAG, CLASSIC_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the description MLflow shows on an experiment's or a run's page


@dataclass(frozen=True)
class LogTarget:
    """Where runs are logged: the tracking store (an absolute URI), the experiment and the parent run of child runs
    ('' = top level). Resolved once where the user's choice comes in (`LogTarget.at`), then passed down whole."""

    tracking_uri: str
    experiment: str
    parent_run_id: str = ""

    @classmethod
    def at(cls, tracking_uri: str | None, experiment: str, parent_run_id: str | None = None) -> LogTarget:
        """`tracking_uri` resolved (`resolve_tracking_uri`: None = the environment's or the default)."""
        return cls(resolve_tracking_uri(tracking_uri), experiment, parent_run_id or "")

    def under(self, parent_run_id: str) -> LogTarget:
        """The same store and experiment, for the children of run `parent_run_id`."""
        return replace(self, parent_run_id=parent_run_id)


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


def client(uri: str) -> MlflowClient:
    """An `MlflowClient` of the (resolved) tracking URI `uri`. A SQLite store is opened once under a file lock
    beside the database: MLflow creates (and migrates) a new database's schema on first use, and two processes
    doing that at once fail ('No such index', 'duplicate column'); the second one now waits and finds it made."""
    uri = resolve_tracking_uri(uri)
    if not uri.startswith("sqlite:") or uri in _OPENED:
        return MlflowClient(tracking_uri=uri)
    with file_lock(_sqlite_path(uri).with_name(_sqlite_path(uri).name + ".lock")):
        mlflow_client = MlflowClient(tracking_uri=uri)  # the store (and a new database's schema) may be made here
        mlflow_client.search_experiments(max_results=1)
    _OPENED.add(uri)
    return mlflow_client


_OPENED: set[str] = set()  # SQLite stores this process has opened (their schema exists)


def _sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///") :].partition("?")[0])


def _artifact_location(uri: str, name: str) -> str | None:
    """Artifacts of a SQLite store go beside the database; servers and other databases choose their own."""
    if not uri.startswith("sqlite:"):
        return None
    db = _sqlite_path(uri)
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._") or "experiment"
    return (db.parent / "artifacts" / slug).as_uri()


def ensure_experiment(uri: str, name: str, description: str | None = None) -> str:
    """The id of experiment `name`, created if missing, marked as a classic model-training experiment (not a GenAI
    one) and given `description` unless it already has one. Call it from the driver before any trial starts."""
    uri = resolve_tracking_uri(uri)
    mlflow_client = client(uri)
    existing = mlflow_client.get_experiment_by_name(name)
    if existing is None:
        try:
            experiment_id = mlflow_client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException:
            # Another process created it between our lookup and our create.
            existing = mlflow_client.get_experiment_by_name(name)
            if existing is None:
                raise
        else:
            existing = mlflow_client.get_experiment(experiment_id)
    if existing.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} (id {existing.experiment_id}) at {uri} is deleted; restore it "
            "(`mlflow experiments restore`), purge it (`mlflow gc`), or choose another name"
        )
    _mark(mlflow_client, existing, description)
    return existing.experiment_id


def _mark(mlflow_client: MlflowClient, experiment: Any, description: str | None) -> None:
    """MLflow 3's UI opens an experiment without this tag on its GenAI (traces) pages; a user's own note stays."""
    tags = experiment.tags or {}
    wanted = {EXPERIMENT_KIND_TAG: CLASSIC_KIND} | ({NOTE_TAG: description} if description else {})
    for key, value in wanted.items():
        if key not in tags:
            mlflow_client.set_experiment_tag(experiment.experiment_id, key, value)


UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def ui_command(uri: str) -> str | None:
    """The command that serves the MLflow UI for a store (this environment's own `mlflow`), or None for a tracking
    server (its UI is already up)."""
    if uri.startswith(("http://", "https://")):
        return None
    return f"{executable('mlflow')} ui --backend-store-uri {uri} --host 127.0.0.1"


# MLflow 3.17's UI decides GenAI vs model-training pages by a workflow switch (default: GenAI, remembered per browser)
# that overrides the experiment's kind tag; this query parameter sets it, so our links open on the runs table.
CLASSIC_VIEW = "?workflowType=machine_learning"


def experiment_link(uri: str, experiment_id: str) -> str:
    """An experiment's runs table in the MLflow UI: on the tracking server itself, else on `ui_command(uri)`'s
    address."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}/runs{CLASSIC_VIEW}"


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI (see `experiment_link`)."""
    if not run_id:
        return ""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}{CLASSIC_VIEW}"


def search_all_runs(mlflow_client: MlflowClient, experiment_ids: list[str], filter_string: str = "",
                    order_by: list[str] | None = None) -> list:
    """Every run matching `filter_string`, page by page (`search_runs` returns at most one page per call)."""
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs(experiment_ids, filter_string, order_by=order_by, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_run(uri: str, run_id: str) -> Run | None:
    """Run `run_id` of the store at `uri`, or None when the store has no such (live) run."""
    try:
        run = client(uri).get_run(run_id)
    except MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


def metric_name(*parts: str) -> str:
    """An MLflow metric key: `parts` joined by '/', each cut to letters, digits and '_-.' (MLflow allows spaces, but
    they break its search syntax and cut chart titles): ('agg', '−RLC', 'total mAP', 'mean') ->
    'agg/-RLC/total_mAP/mean'; 'λ_b 0.1' -> 'lambda_b_0.1'."""
    return "/".join(_clean(part) for part in parts)


def _clean(text: str) -> str:
    text = text.replace("−", "-").replace("α", "alpha").replace("τ", "tau").replace("λ", "lambda")
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_.\-]", "_", text)).strip("_")
