"""comic.tuning: search space and tables (no Ray); then real sweeps on the session's local Ray instance with a real
SQLite MLflow store or a real `mlflow server` on 127.0.0.1: ASHA early stopping, run hierarchy and states, a trial
whose worker is killed resuming into the same run, an interrupted sweep resumed, and the sweep CLI end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from model_helpers import pyfunc_agrees_with_scripts, voc_photos
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from sweep_helpers import InterruptMidTrial, runs_of, spec_for, steps_of

from comic.checkpoint import load_best
from comic.config import ConfigError, apply_overrides, load_config
from comic.tracking.client import RunTracker
from comic.tracking.store import LogTarget
from comic.tuning.cluster import Resources, TuneError, TuneInterrupted, absolute_storage, is_remote_path
from comic.tuning.results import format_confirm, format_trials, markdown_table, ranked, summarize_confirm
from comic.tuning.runner import fit_metrics, run_configs
from comic.tuning.space import Dimension, default_point, load_space, method_space, parse_space, with_learning_rate
from comic.tuning.sweep import _settings, asha_rungs, load_sweep, run_sweep, spec_from_dict, spec_to_dict

REPO = Path(__file__).resolve().parents[2]
SWEEP = str(REPO / "experiments" / "sweep.py")
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")


# --------------------------------------------------------------------------------------------- no Ray


def test_space_forms_and_clear_errors(tmp_path):
    base = load_config("synthetic")
    space = parse_space({"rlc.tau": [0.5, 0.9], "optim.lr_feature": {"loguniform": [1e-4, 1e-2]},
                         "model.groups": {"int": [1, 4]}, "rlc.distribution": {"choice": ["dynamic", "static"]}}, base)
    assert space["rlc.tau"] == Dimension("uniform", 0.5, 0.9)
    assert space["model.groups"].contains(4) and not space["model.groups"].contains(5)
    assert space["rlc.distribution"].describe() == {"choice": ["dynamic", "static"]}
    bad = {"rlc.tua": [0.5, 0.9]}
    with pytest.raises(ConfigError, match="did you mean 'rlc.tau'"):
        parse_space(bad, base)
    for raw, message in [({"rlc.tau": [0.9, 0.5]}, "must be below"), ({"rlc.tau": [0.5, 1.5]}, "rlc.tau"),
                         ({"optim.lr_feature": {"loguniform": [0, 1]}}, "low > 0"),
                         ({"rlc.tau": {"normal": [0, 1]}}, "expected"), ({"train.epochs": [1, 5]}, "ASHA"),
                         ({}, "empty")]:
        with pytest.raises(ConfigError, match=message):
            parse_space(raw, base)
    path = tmp_path / "space.yaml"
    path.write_text("htb.alpha: [1.0, 3.0]\noptim.lr_feature: {loguniform: [1.0e-4, 1.0e-2]}\n")
    assert set(load_space(path, base)) == {"htb.alpha", "optim.lr_feature"}


def test_paper_defaults_are_the_first_point_and_the_lr_is_log_scaled():
    base = load_config("synthetic")
    space = method_space(base)  # COMIC's, from the registry
    point = default_point(space, base)
    assert {k: point[k] for k in ("htb.alpha", "rlc.tau", "mfm.gamma_neg", "mfm.gamma_pos", "loss.lambda_b")} == \
        {"htb.alpha": 2.0, "rlc.tau": 0.7, "mfm.gamma_neg": 3.0, "mfm.gamma_pos": 0.0, "loss.lambda_b": 0.5}
    assert default_point(parse_space({"rlc.tau": [0.8, 0.9]}), base) is None  # 0.7 lies outside: not enqueued
    lr = with_learning_rate(space, base)["optim.lr_feature"]
    assert lr.kind == "loguniform" and math.isclose(lr.low, 3e-4) and math.isclose(lr.high, 3e-2)


def test_storage_paths():
    assert is_remote_path("s3://bucket/x") and is_remote_path("gs://b/y")
    assert not is_remote_path("/nfs/sweeps") and not is_remote_path("file:///tmp/x") and not is_remote_path("C:/x")
    assert absolute_storage("s3://bucket/x/") == "s3://bucket/x"
    assert absolute_storage("rel") == str(Path.cwd() / "rel")
    assert absolute_storage(None) == str(Path.cwd() / "ray_results")


def test_tables_and_confirmation_summary():
    rows = [{"trial": "trial-001", "state": "completed", "epochs": 3, "rlc.tau": 0.7, "val/map": 30.0, "test/map": 20.0,
             "best_epoch": 3},
            {"trial": "trial-002", "state": "early-stopped", "epochs": 1, "rlc.tau": 0.9, "val/map": 31.0,
             "test/map": math.nan, "best_epoch": 1},
            {"trial": "trial-003", "state": "errored", "epochs": 0, "rlc.tau": 0.6, "val/map": math.nan,
             "test/map": math.nan, "best_epoch": 0}]
    table = markdown_table(rows, ["trial", "rlc.tau", "val/map", "test/map"])
    assert table.splitlines()[1] == "|---|---|---|---|" and "| trial-002 | 0.9 | 31 | - |" in table
    assert format_trials(rows, {"rlc.tau": None}).splitlines()[1].lstrip().startswith("trial-002")
    marked = markdown_table(ranked(rows), ["trial", "val/map"], best=rows[1]).splitlines()[2:]
    assert marked == ["| trial-002 (best) | 31 |", "| trial-001 | 30 |", "| trial-003 | - |"]  # by val/map
    runs = [{"best/val/map": 30.0, "best/test/map": 20.0}, {"best/val/map": 32.0, "best/test/map": 22.0}, {},
            {"best/val/map": 29.0, "best/test/map": 19.0}]
    summary = summarize_confirm(rows[:2], [1, 1, 1, 2], runs, {"rlc.tau": None})
    assert summary[0]["n"] == 2 and summary[0]["best/val/map/mean"] == 31.0
    assert math.isclose(summary[0]["best/val/map/std"], math.sqrt(2))  # sample std (ddof=1) of 30 and 32
    assert summary[1]["n"] == 1 and math.isnan(summary[1]["best/val/map/std"])
    text = format_confirm(summary, {"rlc.tau": None})
    assert "31.00 ± 1.41" in text and "| 2 | 0.9 | 1 | 29.00 |" in text


@pytest.mark.parametrize(("max_t", "grace", "rf"),
                         [(40, 2, 2), (40, 1, 3), (3, 1, 2), (8, 2, 2), (5, 5, 2), (30, 4, 4)])
def test_checkpoint_epochs_are_ashas_rungs(max_t, grace, rf):
    """The epochs a sweep trial checkpoints at besides its time policy are where Ray's ASHA bracket may stop it."""
    (bracket,) = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=grace, reduction_factor=rf)._brackets
    assert sorted(asha_rungs(max_t, grace, rf)) == sorted(milestone for milestone, _ in bracket._rungs)


def test_fit_metrics_drops_tune_bookkeeping():
    result = {"epoch": 3, "val/map": 30.5, "best/test/map": 20.0, "training_iteration": 4, "time_total_s": 9.0,
              "mlflow_run_id": "abc", "epochs_planned": 3.0, "done": True, "config": {"cell": 0}}
    assert fit_metrics(result) == {"epoch": 3.0, "val/map": 30.5, "best/test/map": 20.0}


def test_a_saved_spec_loads_back_whole(tmp_path, smoke_overrides):
    """The state file holds every field of the spec but where it is (its path and name), through the base config's
    and the space's own converters; the logged `sweep.*` params are exactly its fixed settings."""
    spec = spec_for(tmp_path, smoke_overrides, seed=7, max_failures=3, confirm_top=2, confirm_seeds=(4, 5),
                    register_model="m", nested_under="0123", shared_storage=True, resources=Resources(0.5, 1, 3))
    state = json.loads(json.dumps({"parent_run_id": "abc", **spec_to_dict(spec)}))
    assert "storage_path" not in state and "name" not in state
    assert spec_from_dict(state, spec.storage_path, spec.name) == spec
    assert _settings(spec) == {"metric": "val/map (max)", "max_t": spec.base.train.epochs, "num_samples": 5,
                               "seed": 7, "grace_period": 1, "reduction_factor": 2, "max_failures": 3,
                               "cpus_per_trial": 0.5, "gpus_per_trial": 1, "max_concurrent": 3}
    assert spec.log_to == LogTarget(spec.tracking_uri, "sweeps", "0123")


def test_cli_rejects_bad_input_naming_the_fix(tmp_path, monkeypatch, capsys, script):
    sweep = script("experiments/sweep.py")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("rlc.tua: [0.5, 0.9]\n")
    cases = [(["--space", "space.yaml"], "did you mean 'rlc.tau'"),
             (["--resume", "--storage-path", "nowhere"], "no sweep to resume"),
             (["--resume", "rlc.tau=0.8"], "drop the overrides"),
             (["--cpus-per-trial", "0"], "cpus_per_trial=0.0: must be > 0"),
             (["--num-samples", "0"], "num_samples=0: must be >= 1")]
    for args, message in cases:
        assert sweep.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (args, err)


# --------------------------------------------------------------------------------------------- Ray


@pytest.mark.ray
def test_optuna_asha_sweep_logs_a_clean_hierarchy(ray_local, smoke_overrides, tmp_path, evaluate_best):
    """(a) TPE + ASHA: one parent, one child per trial, early-stopped trials tagged, nothing left RUNNING."""
    spec = spec_for(tmp_path, smoke_overrides, overrides={"train.epochs": 3})
    result = run_sweep(spec)
    tops, children = runs_of(spec.tracking_uri, "sweeps")
    assert [r.info.run_id for r in tops] == [result.parent_run_id]
    parent = tops[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep"
    kids = children[result.parent_run_id]
    assert len(kids) == 5 == len(result.trials) and len(children) == 1
    assert {r.info.status for r in kids} == {"FINISHED"}
    assert len({r.data.tags["tune.trial_id"] for r in kids}) == 5
    by_id = {r.info.run_id: r for r in kids}
    stopped = [row for row in result.trials if row["state"] == "early-stopped"]
    assert stopped, "ASHA (grace 1, rf 2, sequential trials) stopped no trial"
    for row in result.trials:
        run = by_id[row["mlflow_run_id"]]
        assert run.info.run_name == row["trial"] and run.data.tags["tune.state"] == row["state"]
        assert steps_of(spec.tracking_uri, run.info.run_id) == list(range(1, row["epochs"] + 1))
        assert {"best/val/map", "best/test/map", "best/epoch"} <= set(run.data.metrics)  # early-stopped too
        if row["state"] == "early-stopped":
            assert run.data.tags["early_stopped"] == "true" and int(run.data.tags["stopped_at_epoch"]) < 3
        else:
            assert "early_stopped" not in run.data.tags
    first = result.trials[0]
    assert first["trial"] == "trial-001" and {k: first[k] for k in spec.space} == default_point(spec.space, spec.base)
    scored = [r for r in result.trials if r["state"] != "errored" and math.isfinite(r["val/map"])]
    assert result.best == max(scored, key=lambda r: (r["val/map"], -result.trials.index(r)))  # first on a tie
    assert result.best_config.rlc.tau == result.best["rlc.tau"]
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    files = {a.path for d in (None, "tables", "plots") for a in client.list_artifacts(result.parent_run_id, d)}
    assert {"search_space.yaml", "best_config.yaml", "best_overrides.yaml", "base_config.yaml", "tables/trials.md",
            "tables/trials.csv", "plots/optimization_history.png", "plots/parallel_coordinates.png"} <= files
    assert parent.data.metrics["trials/early_stopped"] == len(stopped)
    assert parent.data.tags["sweep.best_run_id"] == result.best["mlflow_run_id"]
    _check_optuna_study(result)
    _check_best_weights(spec, result, evaluate_best)


def _check_best_weights(spec, result, evaluate_best):
    """Every trial's Tune checkpoint (early-stopped ones too: ASHA's rungs are checkpoint epochs) holds its best-on-val
    weights; the best trial's reproduce its best/test/map."""
    rows = {r["mlflow_run_id"]: r for r in result.trials}
    for trial in tune.ExperimentAnalysis(str(Path(spec.storage_path) / spec.name)).trials:
        row = rows[trial.last_result["mlflow_run_id"]]
        best = load_best(trial.checkpoint.path)
        assert best["epoch"] == row["best_epoch"] and best["metrics"]["best/test/map"] == row["test/map"], row
        if row is result.best or row == result.best:
            cfg = apply_overrides(spec.base, {k: row[k] for k in spec.space})
            assert evaluate_best(cfg, trial.checkpoint.path)["test/map"] == row["test/map"]


def _check_optuna_study(result):
    """The Optuna study persisted beside Tune's state: every trial, ASHA's stops as PRUNED, each with its value."""
    assert result.optuna_storage == f"sqlite:///{Path(result.experiment_path) / 'optuna.db'}"
    study = optuna.load_study(study_name=result.name, storage=result.optuna_storage)
    assert len(study.trials) == len(result.trials)
    states = {"early-stopped": optuna.trial.TrialState.PRUNED, "completed": optuna.trial.TrialState.COMPLETE}
    by_params = {tuple(sorted(t.params.items())): t for t in study.trials}
    for row in result.trials:
        trial = by_params[tuple(sorted((k, row[k]) for k in study.trials[0].params))]
        assert trial.state == states[row["state"]], row
        # the value: the last val/map Tune saw (ASHA's clock stops there); the intermediate values: one per epoch
        assert trial.value == pytest.approx(trial.intermediate_values[max(trial.intermediate_values)])
        assert sorted(trial.intermediate_values) == list(range(1, row["epochs"] + 1))



@pytest.mark.ray
def test_trials_log_over_http_and_a_trial_that_fails_for_good(ray_local, mlflow_server, smoke_overrides, tmp_path):
    """(b) A real MLflow server as tracking URI; a trial that keeps failing is FAILED with its error and gives {}."""
    good = load_config("synthetic", smoke_overrides)
    bad = load_config("synthetic", smoke_overrides | {"model.weights": str(tmp_path / "missing.pt")})
    with RunTracker(mlflow_server, "http-grid", run_name="grid") as parent:
        metrics = run_configs([good, bad], names=["good", "bad"], storage_path=str(tmp_path / "rr"), name="grid",
                              log_to=LogTarget.at(mlflow_server, "http-grid", parent.run_id),
                              resources=Resources(1, 0, 2), max_failures=0, tags=[{"arm": "good"}, {"arm": "bad"}])
    assert metrics[0]["epoch"] == 2 and 0 < metrics[0]["best/val/map"] <= 100 and metrics[1] == {}
    _, children = runs_of(mlflow_server, "http-grid")
    runs = {r.info.run_name: r for r in children[parent.run_id]}
    assert set(runs) == {"good", "bad"}
    assert runs["good"].info.status == "FINISHED" and runs["good"].data.tags["arm"] == "good"
    assert runs["bad"].info.status == "FAILED" and runs["bad"].data.tags["tune.state"] == "errored"
    assert "missing.pt" in runs["bad"].data.tags["error"]
    assert steps_of(mlflow_server, runs["good"].info.run_id) == [1, 2]
    client = MlflowClient(tracking_uri=mlflow_server)
    assert "config.yaml" in {a.path for a in client.list_artifacts(runs["good"].info.run_id)}
    assert any((tmp_path / "served").rglob("config.yaml"))  # uploaded through the server's artifact proxy


class KillWorkerAfter(tune.Callback):
    """SIGKILLs a trial's worker process (Tune's own `pid` of the result) once that trial has reported `epoch`: a
    real crash of the trial, with its epoch checkpoint already persisted."""

    def __init__(self, epoch: int, marker: Path) -> None:
        self.epoch, self.marker = epoch, str(marker)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("epoch") == self.epoch and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(result["pid"]))
            os.kill(int(result["pid"]), signal.SIGKILL)


@pytest.mark.ray
def test_killed_trial_resumes_into_the_same_run(ray_local, smoke_overrides, tmp_path):
    """(e) The trial's worker SIGKILLed after epoch 2 with max_failures=1: Tune restarts the trial from its
    checkpoint, the same MLflow run continues and ends FINISHED, every epoch logged exactly once."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config("synthetic", smoke_overrides | {"train.epochs": 3, "train.checkpoint_every_s": 0})
    (metrics,) = run_configs([cfg], names=["crashy"], storage_path=str(tmp_path / "rr"), name="crash",
                             log_to=LogTarget.at(uri, "crash"), resources=Resources(),
                             max_failures=1, callbacks=[KillWorkerAfter(2, tmp_path / "killed")])
    assert (tmp_path / "killed").is_file() and metrics["epoch"] == 3
    tops, _ = runs_of(uri, "crash")
    (run,) = tops
    assert run.info.status == "FINISHED" and run.data.tags["tune.state"] == "completed"
    assert run.data.tags["resume_count"] == "1"
    for key in ("val/map", "train/loss", "best/test/map"):
        assert steps_of(uri, run.info.run_id, key) == [1, 2, 3], key
    assert run.data.metrics["best/val/map"] == metrics["best/val/map"]


@pytest.mark.ray
# A trial cut off before Tune registered its first checkpoint restarts at epoch 1, and Optuna notes the repeated step.
@pytest.mark.filterwarnings("ignore:The reported value is ignored because this `step=1`:UserWarning")
def test_interrupted_sweep_resumes_without_duplicates(ray_local, smoke_overrides, tmp_path):
    """(f) Stop the driver mid-trial after 2 trials (SIGUSR1 = Tune's Ctrl-C), then resume: the cut-off trial continues
    in its own run, the rest run, nothing runs twice and no child run is duplicated."""
    spec = spec_for(tmp_path, smoke_overrides, num_samples=4)
    with pytest.raises(TuneInterrupted):
        run_sweep(spec, callbacks=[InterruptMidTrial(2, tmp_path / "fired")])
    tops, children = runs_of(spec.tracking_uri, "sweeps")
    (parent,) = tops
    assert parent.info.status == "KILLED"
    before = {r.info.run_id: r for r in children[parent.info.run_id]}
    states = sorted(r.data.tags.get("tune.state") for r in before.values())
    assert states.count("interrupted") == 1 and len(states) >= 3, states
    assert all(r.info.status == ("KILLED" if r.data.tags["tune.state"] == "interrupted" else "FINISHED")
               for r in before.values())
    with pytest.raises(TuneError, match="already exists"):
        run_sweep(spec)
    saved, parent_id = load_sweep(spec.storage_path, None)  # the latest sweep there, as `sweep.py --resume` does
    assert parent_id == parent.info.run_id and saved.num_samples == 4 and saved.base == spec.base
    result = run_sweep(saved, resume=True)
    assert result.parent_run_id == parent.info.run_id and len(result.trials) == 4
    tops, children = runs_of(spec.tracking_uri, "sweeps")
    assert [r.info.status for r in tops] == ["FINISHED"]
    after = {r.info.run_id: r for r in children[parent.info.run_id]}
    assert len(after) == 4 and len({r.data.tags["tune.trial_id"] for r in after.values()}) == 4
    assert {r.info.status for r in after.values()} == {"FINISHED"}
    assert set(before) <= set(after)  # the cut-off trial continued in its own run
    for run_id, run in before.items():
        if run.data.tags["tune.state"] == "interrupted":
            assert after[run_id].data.tags["resume_count"] == "1"
        else:  # ended trials were not run again
            assert "resume_count" not in after[run_id].data.tags
            assert after[run_id].info.end_time == run.info.end_time
    for row in result.trials:
        assert steps_of(spec.tracking_uri, row["mlflow_run_id"]) == list(range(1, row["epochs"] + 1))
    # --resume went on with the same Optuna study: one study, every trial in it, each closed
    assert optuna.get_all_study_names(result.optuna_storage) == [result.name]
    study = optuna.load_study(study_name=result.name, storage=result.optuna_storage)
    assert len(study.trials) == 4
    assert {t.state for t in study.trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}


@pytest.mark.ray
def test_sweep_cli_smoke_with_confirmation(ray_local, smoke_overrides, tmp_path, shared_data, script):
    """`sweep.py --smoke-test --confirm-top 1 --seeds 0 1` end to end (joining the session's Ray instance), leaving
    the confirmed best's model registered: loaded by its alias, it scores real photos as predict.py and evaluation
    do."""
    out, uri = tmp_path / "sweep.json", f"sqlite:///{tmp_path}/mlflow.db"
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, SWEEP, "--smoke-test", "--num-samples", "2", "--confirm-top", "1", "--seeds", "0", "1",
           "--address", address, "--name", "smoke", "--tracking-uri", uri, "--metrics-out", str(out),
           f"data.cache_dir={smoke_overrides['data.cache_dir']}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "best configuration" in proc.stdout and f"ui --backend-store-uri {uri} --host 127.0.0.1" in proc.stdout
    assert " ± " in proc.stdout and (tmp_path / "ray_results" / "smoke" / "comic_sweep.json").is_file()
    assert (tmp_path / "ray_results" / "smoke-confirm-top1-seeds0-1").is_dir()
    payload = json.loads(out.read_text())
    assert len(payload["trials"]) == 2 and payload["confirm"][0]["n"] == 2
    best = load_config("synthetic", path=payload["best_config_path"])  # what `train.py --config` reads
    assert best.htb.alpha == payload["best"]["htb.alpha"] and best.train.epochs == 2
    assert f"train.py --config {payload['best_config_path']}" in proc.stdout
    tops, children = runs_of(uri, "comic-sweep")
    (parent,) = tops
    kids = children[parent.info.run_id]
    phases = sorted(r.data.tags["sweep.phase"] for r in kids)
    assert phases == ["confirm"] * 2 + ["search"] * 2
    assert {r.info.status for r in kids} == {"FINISHED"} and parent.info.status == "FINISHED"
    assert {r.data.params["seed"] for r in kids if r.data.tags["sweep.phase"] == "confirm"} == {"0", "1"}
    assert "confirm/top1/val_map_mean" in parent.data.metrics
    registered = payload["registered_model"]
    assert registered == "models:/comic-smoke@champion" and f"evaluate.py --model {registered}" in proc.stdout
    version = MlflowClient(uri).get_model_version_by_alias("comic-smoke", "champion")
    confirms = [r for r in kids if r.data.tags["sweep.phase"] == "confirm"]
    champion = max(confirms, key=lambda r: r.data.metrics["best/val/map"])  # one config: its best seed by val
    assert version.tags["source_run_id"] == champion.info.run_id and version.tags["sweep_run_id"] == parent.info.run_id
    assert float(version.tags["best_test_map"]) == pytest.approx(champion.data.metrics["best/test/map"], abs=1e-4)
    assert all(r.inputs.dataset_inputs for r in kids)  # every trial's run names its benchmark
    pyfunc_agrees_with_scripts(uri, registered, voc_photos(shared_data), script, tmp_path)
