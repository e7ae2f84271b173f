"""A tracked run: MLflow record of a crash and its resume, and the single-run CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comic.config import load_config
from comic.tracking.run import tracked_fit

mlflow = pytest.importorskip("mlflow")
TRAIN = str(Path(__file__).resolve().parents[2] / "experiments" / "train.py")


def test_crash_then_resume_continues_the_same_mlflow_run(smoke_overrides, tmp_path, crash_after):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config("synthetic", smoke_overrides | {"train.epochs": 3})
    with pytest.raises(RuntimeError, match="crash after epoch 2"):
        tracked_fit(cfg, tracking_uri=uri, experiment="resume", workdir=tmp_path / "run", report=crash_after(2))
    client = mlflow.tracking.MlflowClient(uri)
    (first,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert first.info.status == "FAILED" and "crash after epoch 2" in first.data.tags["error"]
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


def test_train_cli_smoke(tmp_path, smoke_overrides, script, capsys):
    out = tmp_path / "metrics.json"
    argv = ["--smoke-test", "--metrics-out", str(out), f"data.cache_dir={smoke_overrides['data.cache_dir']}",
            "--workdir", str(tmp_path / "work"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "engine.progress=false"]
    assert script("experiments/train.py").main(argv) == 0
    printed = capsys.readouterr().out
    assert "test (best)" in printed and "mlflow ui --backend-store-uri" in printed
    metrics = json.loads(out.read_text())
    assert metrics["epoch"] == 2 and 0 < metrics["best/test/map"] <= 100


def test_train_cli_rejects_a_bad_override(tmp_path, monkeypatch, capsys, script):
    monkeypatch.chdir(tmp_path)
    assert script("experiments/train.py").main(["--smoke-test", "rlc.tua=0.5"]) == 2
    assert "error: unknown config key 'rlc.tua'; did you mean 'rlc.tau'?" in capsys.readouterr().err
