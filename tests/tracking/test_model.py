"""A trained model outside its run: the exported bundle, its thresholds, `evaluate.py`, `predict.py`, the MLflow pyfunc
and `mlflow models serve`."""

from __future__ import annotations

import base64
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import pyfunc_agrees_with_scripts, voc_photos
from sklearn.metrics import f1_score, precision_recall_curve

from comic.config import load_config
from comic.data.images import build_loaders
from comic.engine import evaluate, fit, predict, setup
from comic.inference.bundle import BundleError, ModelBundle, export_run
from comic.inference.predictor import Predictor
from comic.inference.thresholds import f1_thresholds
from comic.tracking.model import MODEL_URI_TAG, bundle_path
from comic.tracking.store import client


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_thresholds_are_the_best_f1_cut_sklearn_finds(seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random((80, 5)) < [0.5, 0.2, 0.05, 0.0, 0.3]).astype(int)
    scores = np.round(rng.random((80, 5)) * 0.6 + 0.4 * targets, 2)  # rounding makes ties
    chosen = f1_thresholds(scores, targets)
    for c in range(5):
        if targets[:, c].sum() == 0:
            assert chosen[c] == 0.5  # no positive: the sigmoid midpoint
            continue
        precision, recall, cuts = precision_recall_curve(targets[:, c], scores[:, c])
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
        assert f1_score(targets[:, c], scores[:, c] >= chosen[c]) == pytest.approx(f1.max())
        assert chosen[c] == pytest.approx(cuts[f1 == f1.max()].max())  # ties: the highest such threshold


@pytest.mark.parametrize("profile", ["frozen", "finetune", "released"])
def test_the_exported_model_reproduces_the_runs_test_map_from_image_files(profile, smoke_overrides, tmp_path):
    cfg = load_config("synthetic", smoke_overrides | {"model.profile": profile})
    result = fit(cfg, workdir=tmp_path / "run")
    path = export_run(cfg, tmp_path / "run", run_id="r1").save(tmp_path / "model.pt")
    bundle = ModelBundle.load(path)
    assert bundle.provenance["run_id"] == "r1" and bundle.provenance["epoch"] == result.metrics["best/epoch"]
    assert (bundle.trunk is not None) == (profile == "frozen")
    s = setup(cfg)
    images = build_loaders(s.bench, cfg.data, 16, cfg.seed)["test"]  # pixels, never the feature cache
    metrics, _ = evaluate(bundle.network(), images, s.rt, np.asarray(bundle.train_counts), "test")
    assert metrics["test/map"] == pytest.approx(result.metrics["best/test/map"], abs=1e-9)
    val = build_loaders(s.bench, cfg.data, 16, cfg.seed)["val"]
    scores, targets = predict(bundle.network(), val, s.rt)  # the thresholds: F1 on val, of the best epoch's scores
    assert np.allclose(bundle.thresholds, f1_thresholds(scores["logits"], targets))


def test_a_damaged_or_foreign_model_file_is_named(tmp_path):
    truncated = tmp_path / "comic_model.pt"
    torch.save({"format": 1, "model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(BundleError, match="comic_model.pt: not a readable COMIC model file"):
        ModelBundle.load(tmp_path)
    torch.save({"format": 99}, tmp_path / "other.pt")
    with pytest.raises(BundleError, match="other.pt: model file format 99"):
        ModelBundle.load(tmp_path / "other.pt")
    with pytest.raises(BundleError, match="no such model file"):
        ModelBundle.load(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smoke_overrides):
    """One `train.py --smoke-test` run with its model logged: (tracking URI, run id, its metrics)."""
    from conftest import REPO, load_script

    folder = tmp_path_factory.mktemp("trained")
    uri, out = f"sqlite:///{folder}/mlflow.db", folder / "metrics.json"
    argv = ["--smoke-test", "--workdir", str(folder / "run"), "--tracking-uri", uri, "--metrics-out", str(out),
            f"data.cache_dir={smoke_overrides['data.cache_dir']}"]
    assert load_script(REPO / "experiments" / "train.py").main(argv) == 0
    (run,) = client(uri).search_runs([client(uri).get_experiment_by_name("comic-train").experiment_id])
    return uri, run, json.loads(out.read_text())


def test_train_logs_its_model_and_its_dataset(trained):
    uri, run, metrics = trained
    assert run.data.tags[MODEL_URI_TAG].startswith("models:/m-")
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == run.data.tags["dataset_name"] and dataset.tags[0].value == "train"
    assert json.loads(dataset.dataset.profile)["splits"]["test"] == 64
    assert bundle_path(f"runs:/{run.info.run_id}", uri) == bundle_path(run.data.tags[MODEL_URI_TAG], uri)


def test_evaluate_script_reproduces_best_test_map_and_records_an_evaluation_run(trained, script, capsys):
    uri, run, metrics = trained
    assert script("experiments/evaluate.py").main(["--model", f"runs:/{run.info.run_id}", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "checkered-red-hexagon" in out and "threshold" in out  # the per-class table
    mlflow_client = client(uri)
    (evaluation,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("comic-evaluate").experiment_id])
    assert evaluation.data.metrics["test/map"] == pytest.approx(metrics["best/test/map"], abs=0.01)
    assert evaluation.data.tags["source_run_id"] == run.info.run_id
    assert evaluation.inputs.dataset_inputs[0].tags[0].value == "eval"
    inputs = mlflow_client.get_run(evaluation.info.run_id).inputs  # the evaluation links the model it used
    assert [m.model_id for m in inputs.model_inputs] == [run.data.tags[MODEL_URI_TAG].split("/")[-1]]


def test_evaluate_refuses_a_benchmark_of_other_classes(trained, script, capsys, shared_data, tmp_path):
    uri, run, _ = trained
    argv = ["--model", f"runs:/{run.info.run_id}", "--tracking-uri", uri, "--preset", "voc2007-dev-lt", "--data",
            str(shared_data / "voc2007-dev" / "VOCdevkit"), f"data.cache_dir={tmp_path}"]
    assert script("experiments/evaluate.py").main(argv) == 2
    assert "a model is evaluated on a benchmark of its own classes" in capsys.readouterr().err


def test_predict_script_names_unreadable_files_and_predicts_the_rest(trained, script, capsys, shared_data, tmp_path):
    uri, run, _ = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    first, second, third = voc_photos(shared_data)
    for photo in (first, second):
        (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / "cut.jpg").write_bytes(third.read_bytes()[:3000])  # a real JPEG, truncated
    (folder / "notes.txt").write_text("not an image\n")
    out = tmp_path / "predictions.csv"
    assert script("experiments/predict.py").main(["--model", f"runs:/{run.info.run_id}", "--tracking-uri", uri,
                                                  str(folder), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "cut.jpg" in err and "notes.txt" in err and "skipped 2" in err
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["image"]).name for r in rows] == [first.name, second.name]
    predictor = Predictor(ModelBundle.load(bundle_path(f"runs:/{run.info.run_id}", uri)))
    expected = predictor.scores([first, second])
    assert np.allclose([[float(r[c]) for c in predictor.class_names] for r in rows], expected, atol=1e-6)


def test_the_logged_pyfunc_scores_real_photos_as_predict_and_evaluate_do(trained, script, shared_data, tmp_path):
    uri, run, _ = trained
    pyfunc_agrees_with_scripts(uri, run.data.tags[MODEL_URI_TAG], voc_photos(shared_data), script, tmp_path)


def test_mlflow_models_serve_answers_a_real_jpeg_with_20_scores(trained, shared_data, tmp_path):
    uri, run, _ = trained
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "serve.log"
    bin_dir = Path(sys.executable).parent  # as in an activated venv: the server starts `uvicorn` from PATH
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", run.data.tags[MODEL_URI_TAG], "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log)
        photo = voc_photos(shared_data)[0]
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(photo.read_bytes()).decode()]]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            (row,) = json.loads(response.read())["predictions"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers, by the process group's pid
        proc.wait(timeout=30)
    scores = {k: v for k, v in row.items() if k != "labels"}
    assert len(scores) == 20 and all(0 <= v <= 1 for v in scores.values())
    bundle = ModelBundle.load(bundle_path(run.data.tags[MODEL_URI_TAG], uri))
    assert np.allclose(list(scores.values()), Predictor(bundle).scores([photo])[0], atol=1e-6)


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"mlflow models serve did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.mark.parametrize("name", ["evaluate", "predict"])
def test_the_model_scripts_smoke_tests_run(name, script, capsys):
    assert script(f"experiments/{name}.py").main(["--smoke-test"]) == 0
    captured = capsys.readouterr()
    assert ("test  " in captured.out) if name == "evaluate" else ("predicted 64 of 64 images" in captured.err)
