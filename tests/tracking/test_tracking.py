"""comic.tracking against a real SQLite MLflow store in tmp_path: run hierarchy and states, resume, params,
batching (MLflow's own chunking), artifacts, tracking-URI resolution and the room's imports."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from comic.report import plots
from comic.tracking.client import PARENT_TAG, RunTracker
from comic.tracking.provenance import run_tags
from comic.tracking.store import ensure_experiment, metric_name, resolve_tracking_uri

REPO = Path(__file__).resolve().parents[2]

# SQLAlchemy 2.1 warns from inside mlflow's store; its text quotes ``noload``, which pyproject's filter misses.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")

# A tracker in a child process: with a `with` block it waits to be killed; without one it ends the way `mode` says.
CHILD = """
import sys, time
from comic.tracking.client import RunTracker
uri, parent, mode = sys.argv[1], sys.argv[2] or None, sys.argv[3]
if mode == "wait":
    with RunTracker(uri, "study", run_name="killed", parent_run_id=parent) as run:
        print(run.run_id, flush=True)
        time.sleep(60)
run = RunTracker(uri, "study", run_name=mode, parent_run_id=parent).start()
print(run.run_id, flush=True)
if mode == "crash":
    raise RuntimeError("crashed outside any with block")
"""


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow database: creating the schema costs ~1.5 s, copying the file nothing."""
    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_db: Path) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    shutil.copyfile(empty_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture
def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def _child(uri: str, parent: str | None, mode: str, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, uri, parent or "", mode],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _killed_child(uri: str, parent: str | None, tmp_path: Path) -> str:
    proc = _child(uri, parent, "wait", tmp_path)
    run_id = proc.stdout.readline().strip()
    assert run_id, proc.communicate(timeout=30)[1]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM  # chained to the default action: the process still dies of SIGTERM
    return run_id


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------------------------- hierarchy, states


def test_parent_and_children_end_in_the_right_states(uri: str, client: MlflowClient, tmp_path: Path) -> None:
    with RunTracker(uri, "study", run_name="sweep") as parent:
        with RunTracker(uri, "study", run_name="ok", parent_run_id=parent.run_id) as ok:
            ok.log_metrics({"val/map": 0.5}, step=1)
        failing = RunTracker(uri, "study", run_name="bad", parent_run_id=parent.run_id)
        with pytest.raises(ValueError, match="boom"), failing:
            raise ValueError("boom at epoch 3")
        killed_id = _killed_child(uri, parent.run_id, tmp_path)

    runs = {r.info.run_id: r for r in client.search_runs([ensure_experiment(uri, "study")])}
    assert len(runs) == 4
    assert {r.info.status for r in runs.values()} == {"FINISHED", "FAILED", "KILLED"}
    assert runs[parent.run_id].info.status == "FINISHED"
    assert runs[ok.run_id].info.status == "FINISHED"
    assert runs[killed_id].info.status == "KILLED"
    assert runs[killed_id].data.tags["error"] == "terminated by SIGTERM"
    bad = runs[failing.run_id]
    assert bad.info.status == "FAILED"
    assert bad.data.tags["error"] == "ValueError: boom at epoch 3"
    error_txt = Path(client.download_artifacts(bad.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert "Traceback" in error_txt and "boom at epoch 3" in error_txt
    for child in (ok.run_id, failing.run_id, killed_id):
        assert runs[child].data.tags[PARENT_TAG] == parent.run_id
    assert PARENT_TAG not in runs[parent.run_id].data.tags


def test_keyboard_interrupt_marks_killed(uri: str, client: MlflowClient) -> None:
    tracker = RunTracker(uri, "study")
    with pytest.raises(KeyboardInterrupt), tracker:
        raise KeyboardInterrupt
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["error"] == "KeyboardInterrupt"


def test_sigterm_chains_to_previous_handler_and_restores_it(uri: str, client: MlflowClient) -> None:
    seen: list[int] = []

    def previous(signum: int, frame: object) -> None:
        seen.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        tracker = RunTracker(uri, "study").start()
        assert signal.getsignal(signal.SIGTERM) is not previous
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
        assert client.get_run(tracker.run_id).info.status == "KILLED"
        assert signal.getsignal(signal.SIGTERM) is previous
        tracker.end()  # already ended: a no-op
        assert client.get_run(tracker.run_id).info.status == "KILLED"
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_during_an_mlflow_call_waits_for_it(uri: str, client: MlflowClient, monkeypatch) -> None:
    seen: list[str] = []
    original = MlflowClient.log_batch

    def log_batch(self, run_id, **kwargs):
        if kwargs.get("metrics"):
            os.kill(os.getpid(), signal.SIGTERM)  # lands while the store call is in progress
        result = original(self, run_id, **kwargs)
        seen.append("batch written")
        return result

    old = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append("previous handler"))
    try:
        tracker = RunTracker(uri, "study").start()
        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
        tracker.log_metrics({"val/map": 0.3}, step=1)
        # the metric batch, then (deferred) the 'error' tag of the KILLED run, then the chained handler
        assert seen == ["batch written", "batch written", "previous handler"]
        assert client.get_run(tracker.run_id).info.status == "KILLED"
        assert _steps(client, tracker.run_id, "val/map") == [1]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_tracker_in_a_worker_thread_leaves_signals_alone(uri: str, client: MlflowClient) -> None:
    before = signal.getsignal(signal.SIGTERM)
    trackers: list[RunTracker] = []

    def trial() -> None:  # Ray Tune runs function trainables in a thread like this
        with RunTracker(uri, "study", run_name="threaded") as run:
            trackers.append(run)
            assert signal.getsignal(signal.SIGTERM) == before
            run.log_metrics({"val/map": 0.1}, step=1)

    worker = threading.Thread(target=trial)
    worker.start()
    worker.join(timeout=60)
    assert client.get_run(trackers[0].run_id).info.status == "FINISHED"


def test_atexit_closes_runs_left_open(uri: str, client: MlflowClient, tmp_path: Path) -> None:
    crash = _child(uri, None, "crash", tmp_path)
    forgot = _child(uri, None, "forgot", tmp_path)
    crash_out, _ = crash.communicate(timeout=60)
    forgot_out, _ = forgot.communicate(timeout=60)
    assert crash.returncode == 1 and forgot.returncode == 0
    crashed = client.get_run(crash_out.strip())
    assert crashed.info.status == "FAILED"
    assert crashed.data.tags["error"] == "RuntimeError: crashed outside any with block"
    assert client.get_run(forgot_out.strip()).info.status == "KILLED"


def test_end_rejects_unknown_status(uri: str) -> None:
    with RunTracker(uri, "study") as run, pytest.raises(ValueError, match="FINISHED"):
        run.end("DONE")


def test_mlflow_run_id_env_is_cleared(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")
    with RunTracker(uri, "study"):
        assert "MLFLOW_RUN_ID" not in os.environ


# --------------------------------------------------------------------------------------------- resume


def test_resume_logs_each_step_once(uri: str, client: MlflowClient) -> None:
    first = RunTracker(uri, "study", run_name="trial")
    with pytest.raises(RuntimeError), first:
        first.log_params({"lr": 1e-4, "rlc.tau": 0.7})
        for step in (1, 2, 3):
            first.log_metrics({"val/map": step / 10, "train/loss": 1 / step}, step=step)
        raise RuntimeError("injected after epoch 3")
    assert client.get_run(first.run_id).info.status == "FAILED"

    with RunTracker(uri, "study", run_id=first.run_id) as again:
        assert again.last_step("val/map") == 3
        assert again.last_step("never/logged") is None
        again.log_params({"lr": 1e-4, "rlc.tau": 0.7})
        written = [again.log_metrics({"val/map": step / 100, "train/loss": 0.0}, step=step) for step in range(1, 6)]
    assert written == [0, 0, 0, 2, 2]

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resume_count"] == "1"
    assert "error" not in run.data.tags and run.data.tags["error.previous"].startswith("RuntimeError")
    assert _steps(client, first.run_id, "val/map") == [1, 2, 3, 4, 5]
    assert _steps(client, first.run_id, "train/loss") == [1, 2, 3, 4, 5]
    values = {m.step: m.value for m in client.get_metric_history(first.run_id, "val/map")}
    assert values[2] == pytest.approx(0.2) and values[5] == pytest.approx(0.05)


def test_reattach_to_unknown_run_is_a_clear_error(uri: str) -> None:
    ensure_experiment(uri, "study")
    with pytest.raises(ValueError, match="cannot reattach"):
        RunTracker(uri, None, run_id="f" * 32).start()


# --------------------------------------------------------------------------------------------- params, metrics


class _Spy:
    """Counts what each batch that reaches the SQLite store carries (after MLflow's own chunking), then forwards it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, int, int]] = []
        original = SqlAlchemyStore.log_batch

        def log_batch(store, run_id, metrics, params, tags):
            self.calls.append((len(metrics), len(params), len(tags)))
            return original(store, run_id, metrics, params, tags)

        monkeypatch.setattr(SqlAlchemyStore, "log_batch", log_batch)


def test_params_chunked_idempotent_and_immutable(uri: str, client: MlflowClient, monkeypatch) -> None:
    many = {f"group{i // 10}.key{i}": i * 0.5 for i in range(150)}
    many["long"] = "x" * 7000
    with RunTracker(uri, "study") as run:
        spy = _Spy(monkeypatch)
        assert run.log_params(many) == 151
        assert [params for _, params, _ in spy.calls] == [100, 51]
        assert run.log_params(many) == 0  # identical values (the long one truncated the same way): nothing to do
        with pytest.raises(ValueError, match=r"immutable.*group0\.key1: logged '0\.5', now '9'"):
            run.log_params({"group0.key1": 9, "fresh": 1})
    params = client.get_run(run.run_id).data.params
    assert len(params) == 151 and "fresh" not in params  # a conflicting call writes nothing
    assert params["group1.key12"] == "6.0" and len(params["long"]) == 6000


def test_metrics_go_out_in_batches_of_1000(uri: str, client: MlflowClient, monkeypatch) -> None:
    with RunTracker(uri, "study") as run:
        spy = _Spy(monkeypatch)
        assert run.log_metrics({f"class_ap/c{i}": i / 2500 for i in range(2500)}, step=1) == 2500
        assert [metrics for metrics, _, _ in spy.calls] == [1000, 1000, 500]
        spy.calls.clear()
        run.log_metrics({"val/map": 0.4, "train/loss": float("nan"), "perf/img_per_s": 120}, step=1)
        assert [metrics for metrics, _, _ in spy.calls] == [3]
        spy.calls.clear()
        assert run.log_metrics({"val/map": 0.5}, step=1) == 0  # same step again: dropped, no call
        assert spy.calls == []
        with pytest.raises(TypeError, match="val/map"):
            run.log_metrics({"val/map": "high"}, step=2)
    assert len(client.get_metric_history(run.run_id, "class_ap/c2499")) == 1
    assert math.isnan(client.get_metric_history(run.run_id, "train/loss")[0].value)


# --------------------------------------------------------------------------------------------- artifacts, tags


def test_artifacts_and_tags(uri: str, client: MlflowClient, tmp_path: Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("# run notes\n")
    rows = [{"class": "person", "ap": 0.8, "train_count": 1240}, {"class": "toaster", "ap": 0.2, "train_count": 8}]
    with RunTracker(uri, "study", tags={"method": "comic"}) as run:
        run.set_tags(run_tags({"device": "cpu", "dataset.card_hash": "abc123"}))
        run.log_dict({"loss": {"tau": 0.7}, "root": tmp_path}, "config.json")
        run.log_dict({"loss": {"tau": 0.7}}, "config.yaml")
        run.log_table(rows, "per_class_ap")
        run.log_table(pd.DataFrame(rows), "from_pandas.parquet")
        run.log_table({"class": ["person"], "ap": [0.8]}, "columns", artifact_path=None)
        run.log_figure(
            plots.plot_shot_groups({"many": 0.6, "medium": 0.5, "few": 0.4, "total": 0.5}), "plots/shots.png"
        )
        run.log_artifact(notes, "notes")
    info = client.get_run(run.run_id)
    assert info.data.tags["method"] == "comic" and info.data.tags["device"] == "cpu"
    assert info.info.artifact_uri.startswith((tmp_path / "artifacts" / "study").as_uri())
    listed = {a.path for folder in ("", "tables", "plots", "notes") for a in client.list_artifacts(run.run_id, folder)}
    expected = {"config.json", "config.yaml", "columns.csv", "tables/per_class_ap.parquet", "tables/per_class_ap.csv"}
    assert expected | {"plots/shots.png", "notes/notes.md"} <= listed
    local = Path(client.download_artifacts(run.run_id, "", str(tmp_path / "dl")))
    assert pq.read_table(local / "tables" / "per_class_ap.parquet").to_pylist() == rows
    assert pq.read_table(local / "tables" / "from_pandas.parquet").to_pylist() == rows
    assert (local / "tables" / "per_class_ap.csv").read_text().splitlines()[1] == '"person",0.8,1240'
    assert json.loads((local / "config.json").read_text()) == {"loss": {"tau": 0.7}, "root": str(tmp_path)}


def test_run_tags_provenance() -> None:
    tags = run_tags({"device": "NVIDIA H100", "dataset.card_hash": 42})
    assert all(isinstance(v, str) for v in tags.values())
    for key in ("host", "version.python", "version.torch", "version.mlflow", "version.ray", "version.optuna"):
        assert tags[key]
    assert tags["device"] == "NVIDIA H100" and tags["dataset.card_hash"] == "42"
    if tags["git.commit"] != "unknown":
        assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")


# --------------------------------------------------------------------------------------------- URI, experiment


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    here = Path.cwd()
    assert resolve_tracking_uri() == f"sqlite:///{here}/mlruns/mlflow.db"
    assert (here / "mlruns").is_dir()
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{here}/sub/x.db"
    assert (here / "sub").is_dir()
    assert resolve_tracking_uri(f"sqlite:///{here}/y.db?timeout=30") == f"sqlite:///{here}/y.db?timeout=30"
    assert resolve_tracking_uri("http://127.0.0.1:5055") == "http://127.0.0.1:5055"
    assert resolve_tracking_uri("databricks") == "databricks"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri() == f"sqlite:///{here}/env.db"
    assert resolve_tracking_uri("https://mlflow.example") == "https://mlflow.example"  # explicit beats env
    for folder in ("./mlruns", "file:///tmp/mlruns", str(here / "store")):
        with pytest.raises(ValueError, match="MLFLOW_ALLOW_FILE_STORE=true") as caught:
            resolve_tracking_uri(folder)
        assert "sqlite:///" in str(caught.value)
    with pytest.raises(ValueError, match="in-memory"):
        resolve_tracking_uri("sqlite://")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert resolve_tracking_uri("./mlruns") == (here / "mlruns").as_uri()


def test_ensure_experiment_is_idempotent_and_refuses_deleted(uri: str, client: MlflowClient) -> None:
    first = ensure_experiment(uri, "study one")
    assert ensure_experiment(uri, "study one") == first
    client.delete_experiment(first)
    with pytest.raises(ValueError, match="deleted"):
        ensure_experiment(uri, "study one")


@pytest.mark.parametrize(("parts", "key"), [
    (("agg", "−RLC", "total mAP", "mean"), "agg/-RLC/total_mAP/mean"),
    (("pooled", "λ_b 0.1", "few", "diff"), "pooled/lambda_b_0.1/few/diff"),
    (("agg", "α = 2 (τ 0.9)", "n"), "agg/alpha_2_tau_0.9/n"),
])
def test_metric_names_keep_to_letters_digits_and_separators(parts, key):
    assert metric_name(*parts) == key
