"""A tracked run: MLflow record of a crash and its resume, and the single-run CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from comic.config import load_config
from comic.session import tracked_fit

mlflow = pytest.importorskip("mlflow")
TRAIN = str(Path(__file__).resolve().parents[1] / "experiments" / "train.py")


def test_crash_then_resume_continues_the_same_mlflow_run(smoke_overrides, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config("synthetic", smoke_overrides | {"train.epochs": 3, "engine.fail_at_epoch": 2})
    with pytest.raises(RuntimeError, match="injected failure"):
        tracked_fit(cfg, tracking_uri=uri, experiment="resume", workdir=tmp_path / "run")
    client = mlflow.tracking.MlflowClient(uri)
    (first,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert first.info.status == "FAILED" and "injected failure" in first.data.tags["error"]
    result, run_id = tracked_fit(cfg, tracking_uri=uri, experiment="resume", workdir=tmp_path / "run")
    assert run_id == first.info.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("val/map", "train/loss", "test/map"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [1, 2, 3], (key, steps)
    assert run.data.metrics["best/val/map"] == result.metrics["best/val/map"]
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "tables")}
    assert {"config.yaml", "map_curves.png", "tables/per_class_ap.parquet", "tables/per_class_ap.csv"} <= artifacts
    longer = load_config("synthetic", smoke_overrides | {"train.epochs": 4, "engine.threads": 1})
    _, again = tracked_fit(longer, tracking_uri=uri, experiment="resume", workdir=tmp_path / "run")
    assert again == run_id  # engine knobs and a longer schedule may change on resume (they are tags, not params)
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/map")) == [1, 2, 3, 4]
    assert client.get_run(run_id).data.tags["config.train.epochs"] == "4"


def test_train_cli_smoke(tmp_path):
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, TRAIN, "--smoke-test", "--metrics-out", str(out),
                           f"data.cache_dir={tmp_path / 'data'}", "--workdir", str(tmp_path / "work"),
                           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test (best)" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    metrics = json.loads(out.read_text())
    assert metrics["epoch"] == 2 and 0 < metrics["best/test/map"] <= 100


def test_train_cli_rejects_a_bad_override(tmp_path):
    proc = subprocess.run([sys.executable, TRAIN, "--smoke-test", "rlc.tua=0.5"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "did you mean 'rlc.tau'" in proc.stderr
