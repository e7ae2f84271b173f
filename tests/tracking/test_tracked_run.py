"""A tracked run: MLflow record of a crash and its resume, the single-run CLI end to end, and the faults around it
(two drivers on a new store, a work directory of another store, a built benchmark, bad paths, offline weights)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

from comic.config import load_config
from comic.data.build import ensure_benchmark
from comic.tracking.run import tracked_fit

mlflow = pytest.importorskip("mlflow")
TRAIN = str(Path(__file__).resolve().parents[2] / "experiments" / "train.py")


def test_crash_then_resume_continues_the_same_mlflow_run(smoke_overrides, tmp_path, crash_after):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # A checkpoint every epoch, so every epoch's best/test/... is measured (on the best weights, as at each write).
    cfg = load_config("synthetic", smoke_overrides | {"train.epochs": 3, "train.checkpoint_every_s": 0})
    with pytest.raises(RuntimeError, match="crash after epoch 2"):
        tracked_fit(cfg, tracking_uri=uri, experiment="resume", workdir=tmp_path / "run", report=crash_after(2))
    client = mlflow.tracking.MlflowClient(uri)
    (first,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert first.info.status == "FAILED" and "crash after epoch 2" in first.data.tags["error"]
    result, run_id = tracked_fit(cfg, tracking_uri=uri, experiment="resume", workdir=tmp_path / "run")
    assert run_id == first.info.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("val/map", "train/loss", "best/test/map"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [1, 2, 3], (key, steps)
    assert run.data.metrics["best/val/map"] == result.metrics["best/val/map"]
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "tables")}
    assert {"config.yaml", "map_curves.png", "tables/per_class_ap.parquet", "tables/per_class_ap.csv"} <= artifacts
    longer = load_config("synthetic", smoke_overrides | {"train.epochs": 4, "engine.threads": 1,
                                                         "train.checkpoint_every_s": 0})
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
    assert "test (best)" in printed and "ui --backend-store-uri" in printed
    metrics = json.loads(out.read_text())
    assert metrics["epoch"] == 2 and 0 < metrics["best/test/map"] <= 100


def test_train_cli_rejects_a_bad_override(tmp_path, monkeypatch, capsys, script):
    monkeypatch.chdir(tmp_path)
    assert script("experiments/train.py").main(["--smoke-test", "rlc.tua=0.5"]) == 2
    assert "error: unknown config key 'rlc.tua'; did you mean 'rlc.tau'?" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- faults


RACE = """
import sys, time
from pathlib import Path
from comic.tracking.client import RunTracker
go = Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
with RunTracker(sys.argv[1], "race", run_name=sys.argv[3]) as run:
    print("run", run.run_id, flush=True)
"""


def test_two_drivers_on_a_new_sqlite_store_both_start(tmp_path):
    """Row 7: two processes open a new SQLite store in the same instant (as two sweeps' drivers do): MLflow's schema
    set-up is serialised by a file lock, so both runs start (no 'No such index' race)."""
    uri, go = f"sqlite:///{tmp_path}/new.db", tmp_path / "go"
    env = os.environ | {"PYTHONPATH": str(Path(TRAIN).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, uri, str(go), f"driver{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["driver0", "driver1"]


def test_a_work_directory_of_another_store_and_a_finished_rerun(smoke_overrides, tmp_path, script, capsys, caplog):
    """Row 8 and a finished run rerun: the work directory remembers a run the second store lacks -> a new run there
    (with a warning saying why); the same command again -> 'already finished' and its results, nothing trained."""
    train = script("experiments/train.py")
    argv = ["--smoke-test", "--workdir", str(tmp_path / "work"), f"data.cache_dir={smoke_overrides['data.cache_dir']}",
            "engine.progress=false"]
    assert train.main([*argv, "--tracking-uri", f"sqlite:///{tmp_path}/a.db"]) == 0
    with caplog.at_level(logging.WARNING, logger="comic.tracking.run"):
        assert train.main([*argv, "--tracking-uri", f"sqlite:///{tmp_path}/b.db"]) == 0
    assert "which the tracking store" in caplog.text and "starting a new run" in caplog.text
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/b.db")
    (run,) = client.search_runs([client.get_experiment_by_name("comic-train").experiment_id])
    assert run.info.status == "FINISHED" and [m.step for m in client.get_metric_history(run.info.run_id,
                                                                                      "val/map")] == [1, 2]
    capsys.readouterr()
    assert train.main([*argv, "--tracking-uri", f"sqlite:///{tmp_path}/b.db"]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "test (best)" in out
    assert client.get_run(run.info.run_id).data.tags.get("resume_count") is None  # not reattached, not retrained


def test_a_work_directory_of_another_configuration_is_refused_and_its_run_left_alone(smoke_overrides, tmp_path,
                                                                                     script, capsys):
    """`--workdir` naming another configuration's run: one error line naming the folder, and that run's MLflow
    record untouched (before: its params clashed on reattach, a traceback, and the finished run marked FAILED)."""
    train = script("experiments/train.py")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--smoke-test", "--workdir", str(tmp_path / "work"), "--tracking-uri", uri,
            f"data.cache_dir={smoke_overrides['data.cache_dir']}", "engine.progress=false"]
    assert train.main([*argv, "method=bce"]) == 0
    client = mlflow.tracking.MlflowClient(uri)
    (first,) = client.search_runs([client.get_experiment_by_name("comic-train").experiment_id])
    capsys.readouterr()
    assert train.main([*argv, "method=comic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "work") in err and "Traceback" not in err
    again = client.get_run(first.info.run_id)
    assert again.info.status == "FINISHED" and again.data.tags.get("resume_count") is None
    assert again.data.params["method"] == "bce"


def test_a_built_benchmark_decides_what_is_recorded(smoke_overrides, tmp_path, script, capsys):
    """Row 13: `--data <built benchmark>`: a data.* override that would change it is refused; without one, the
    logged data params and tags come from its card, and the card is logged."""
    cfg = load_config("synthetic", smoke_overrides | {"data.missing_rate": 0.3})
    built = ensure_benchmark(cfg.data)
    train = script("experiments/train.py")
    common = ["--smoke-test", "--data", str(built), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--workdir",
              str(tmp_path / "work"), "engine.progress=false", f"data.cache_dir={smoke_overrides['data.cache_dir']}"]
    assert train.main([*common, "data.missing_rate=0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.missing_rate=0.0 (built with 0.3) would change it" in err
    assert train.main(common) == 0
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    (run,) = client.search_runs([client.get_experiment_by_name("comic-train").experiment_id])
    assert run.data.params["data.missing_rate"] == "0.3" and run.data.tags["dataset"] == "synthetic"
    assert run.data.tags["dataset_name"] == built.name
    assert {"dataset/card.json", "dataset/trunk.json"} <= {a.path for a in client.list_artifacts(run.info.run_id,
                                                                                                  "dataset")}
    trunk = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/dataset/trunk.json")
    assert trunk["backbone"] == "tiny" and trunk["preprocess"]["resize"] == round(256 / 224 * 32)  # torchvision's


def test_bad_paths_and_unreachable_weights_are_one_line_before_any_cache(smoke_overrides, tmp_path, script, capsys,
                                                                          monkeypatch):
    """Row 14 and item 6: a data folder that does not exist, and ImageNet weights unreachable offline: one `error:`
    line each, and the weights fail before any image cache is built."""
    train = script("experiments/train.py")
    monkeypatch.chdir(tmp_path)
    assert train.main(["--smoke-test", "--data", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: --data {tmp_path / 'nowhere'}: folder not found\n"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cache = tmp_path / "fresh"
    assert train.main(["--smoke-test", "model.backbone=mobilenet_v2", "model.weights=imagenet",
                       f"data.cache_dir={cache}", "engine.progress=false"]) == 2
    err = capsys.readouterr().err  # MLflow may log its database set-up above; the failure itself is one line
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: could not fetch the ImageNet weights of mobilenet_v2") and "Traceback" not in err
    assert str(tmp_path / "empty_hub") in err and not list(cache.rglob("*.arrow"))  # no image cache was built
