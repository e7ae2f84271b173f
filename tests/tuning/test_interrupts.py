"""Real faults thrown at sweeps: interrupts at every phase, damaged state files, impossible requests, SIGTERM from
outside (`make demo` killed) and a local Ray that nobody without its token can use. Each asserts the end state: exit
code, parent and child states, no run left RUNNING, no duplicated step, summary metrics final."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ray import tune
from sweep_helpers import InterruptAfterCheckpoint, InterruptAtStart, runs_of, spec_for, steps_of, wait_for

from comic.tuning.cluster import TuneError, TuneInterrupted
from comic.tuning.runner import fit_tuner
from comic.tuning.sweep import STATE_FILE, run_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEP = str(REPO / "experiments" / "sweep.py")
pytestmark = [pytest.mark.ray,
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The reported value is ignored because this `step=1`:UserWarning")]


def _never_running(uri: str) -> list:
    tops, children = runs_of(uri, "sweeps")
    everything = tops + [r for kids in children.values() for r in kids]
    assert all(r.info.status != "RUNNING" for r in everything), [(r.info.run_name, r.info.status) for r in everything]
    return everything


def _metric(client: MlflowClient, run_id: str, key: str) -> float:
    """The value at the highest step of a metric (what a resumed parent shows last)."""
    return max(client.get_metric_history(run_id, key), key=lambda m: m.step).value


def test_interrupt_before_the_last_trial_reports(ray_local, smoke_overrides, tmp_path):
    """Row 1: Ctrl-C after the last trial was created, before it reported: interrupted, parent KILLED; resumable."""
    spec = spec_for(tmp_path, smoke_overrides, num_samples=2, overrides={"train.epochs": 1})
    with pytest.raises(TuneInterrupted):
        run_sweep(spec, callbacks=[InterruptAtStart(2, tmp_path / "fired")])
    (parent,), _ = runs_of(spec.tracking_uri, "sweeps")
    assert parent.info.status == "KILLED"
    _never_running(spec.tracking_uri)
    result = run_sweep(spec, resume=True)
    assert len(result.trials) == 2 and {r["state"] for r in result.trials} == {"completed"}
    assert runs_of(spec.tracking_uri, "sweeps")[0][0].info.status == "FINISHED"
    _never_running(spec.tracking_uri)


def _saved_checkpoint(storage: Path, run_id: str) -> Path:
    """The state.pt of the checkpoint Tune's saved state will resume the trial whose MLflow run is `run_id` from (a
    later one the trial wrote while the stop took effect is on disk but not registered)."""
    (trial,) = [t for t in tune.ExperimentAnalysis(str(storage / "sweep")).trials
                if t.last_result.get("mlflow_run_id") == run_id]
    return Path(trial.checkpoint.path) / "checkpoint" / "state.pt"


def test_interrupted_last_wave_damaged_checkpoint_and_restart(ray_local, smoke_overrides, tmp_path):
    """Rows 2, 3, 6: Ctrl-C while the last trial runs -> interrupted (not a normal report); its checkpoint then
    truncated -> `resume` errors it, naming the file, and never chooses it as best; `--restart-errored` runs it from
    scratch, and the parent's summary metrics end final."""
    # grace period = epochs: ASHA never stops a trial here, so the cut-off one is only ever interrupted
    # a checkpoint every epoch: the one of epoch 1 is what the interrupt waits for
    spec = spec_for(tmp_path, smoke_overrides, num_samples=2, grace_period=2,
                    overrides={"train.epochs": 2, "train.checkpoint_every_s": 0})
    with pytest.raises(TuneInterrupted):
        run_sweep(spec, callbacks=[InterruptAfterCheckpoint(1, tmp_path / "fired")])
    (parent,), children = runs_of(spec.tracking_uri, "sweeps")
    assert parent.info.status == "KILLED"
    states = {r.data.tags["tune.state"]: r for r in children[parent.info.run_id]}
    assert set(states) == {"completed", "interrupted"} and states["interrupted"].info.status == "KILLED"
    _never_running(spec.tracking_uri)
    cut = states["interrupted"].info.run_id
    state_pt = _saved_checkpoint(Path(spec.storage_path), cut)
    state_pt.write_bytes(state_pt.read_bytes()[:100])  # a truncated checkpoint

    result = run_sweep(spec, resume=True)
    rows = {r["mlflow_run_id"]: r for r in result.trials}
    assert rows[cut]["state"] == "errored" and result.best["mlflow_run_id"] != cut
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    errored = client.get_run(cut)
    assert errored.info.status == "FAILED" and "--restart-errored" in errored.data.tags["error"]
    assert str(state_pt.parent.parent) in errored.data.tags["error"]  # Tune's own checkpoint, not a temporary copy
    parent = client.get_run(parent.info.run_id)
    assert client.get_run(parent.data.tags["sweep.best_run_id"]).info.status == "FINISHED"

    result = run_sweep(spec, resume=True, restart_errored=True)
    assert {r["state"] for r in result.trials} == {"completed"}
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert _metric(client, parent.info.run_id, "trials/completed") == 2
    assert _metric(client, parent.info.run_id, "trials/errored") == 0
    assert _metric(client, parent.info.run_id, "best/val/map") == result.best["val/map"]
    assert steps_of(spec.tracking_uri, cut) == [1, 2]  # restarted from scratch: each epoch once in its run
    _never_running(spec.tracking_uri)


def test_damaged_sweep_and_tune_state_are_named(ray_local, smoke_overrides, tmp_path, capsys, script):
    """Rows 4 and 5: a truncated comic_sweep.json or one without a key, and a truncated Tune state file: one line
    naming the file and the way out."""
    sweep = script("experiments/sweep.py")
    folder = tmp_path / "ray_results" / "broken"
    folder.mkdir(parents=True)
    args = ["--resume", "--storage-path", str(tmp_path / "ray_results"), "--name", "broken"]
    for text, words in (('{"parent_run_id": "ab', "JSONDecodeError"), ('{"parent_run_id": "ab"}', "missing 'base'")):
        (folder / STATE_FILE).write_text(text)
        assert sweep.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: the sweep state {folder / STATE_FILE} is damaged") and words in err, err

    experiment = tmp_path / "tune" / "tiny"
    tune.Tuner(lambda config: {"x": 1}, param_space={"a": tune.grid_search([1, 2])},
               run_config=tune.RunConfig(name="tiny", storage_path=str(tmp_path / "tune"), verbose=0)).fit()
    (state,) = sorted(experiment.glob("experiment_state-*.json"))[-1:]
    state.write_text(state.read_text()[:50])
    with pytest.raises(TuneError, match=f"the Tune state file {state} is damaged.*delete it"):
        fit_tuner(str(experiment), lambda config: None, lambda: None, expected=2, resume=True)


def test_impossible_requests_fail_fast(tmp_path):
    """Row 9: more GPUs per trial than a local Ray can ever offer: an error before any trial, not a hang."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, SWEEP, "--smoke-test", "--gpus-per-trial", "1", "--num-cpus", "1",
                           "--name", "gpu", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: no node of this Ray cluster can run a trial with 1 CPUs and 1 GPUs" in proc.stderr


def _first_epoch_logged(db: Path) -> bool:
    if not db.is_file():
        return False
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from metrics where key = 'val/map'").fetchone()[0] > 0
    except sqlite3.OperationalError:  # the schema is not made yet
        return False


def test_make_demo_killed_from_outside_is_an_interruption(ray_local, smoke_overrides, tmp_path):
    """Row 11: SIGTERM to `make demo` once a trial logged its first epoch: an interrupted sweep (exit != 0, the
    resume command printed, parent KILLED, the running trial's run KILLED and nothing RUNNING)."""
    db = tmp_path / "mlflow.db"
    args = (f"--smoke-test --num-samples 2 --address {ray_local.get_runtime_context().gcs_address} --name killed "
            f"--storage-path {tmp_path / 'rr'} --tracking-uri sqlite:///{db} --experiment sweeps "
            f"data.cache_dir={smoke_overrides['data.cache_dir']} train.epochs=4")
    make = subprocess.Popen(["make", "-s", "demo", f"DEMO_ARGS={args}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: _first_epoch_logged(db), "the first logged epoch", timeout=300, every=0.2)
    make.send_signal(signal.SIGTERM)
    out, err = make.communicate(timeout=300)
    assert make.returncode != 0
    assert "interrupted; the sweep is saved. Continue it with:" in err and "--resume" in err, err[-3000:]
    (parent,), children = runs_of(f"sqlite:///{db}", "sweeps")
    assert parent.info.status == "KILLED" and children[parent.info.run_id]
    assert any(r.info.status == "KILLED" for r in children[parent.info.run_id])
    _never_running(f"sqlite:///{db}")


TOKEN_CLIENT = """
import sys, ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR")
    print("connected", ray.cluster_resources().get("CPU"))
except Exception as err:
    print("refused", type(err).__name__, str(err).splitlines()[0][:200])
"""

EMBEDDED = """
import sys, os
from pathlib import Path
from comic.tuning.cluster import connect_ray
import ray
connect_ray(num_cpus=1)
token = (Path.home() / ".ray" / "auth_token").read_text().strip()
print(ray.get_runtime_context().gcs_address, os.environ["RAY_AUTH_MODE"], token, flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def test_the_embedded_local_ray_refuses_clients_without_its_token(tmp_path):
    """Row 12: the local Ray the project starts (RAY_AUTH_MODE unset, as for a user) uses Ray's token auth with the
    token it generates in the owner's ~/.ray: a client without it is refused, one with it connects."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"PYTHONPATH": str(REPO),
                                                                                   "HOME": str(tmp_path)}
    owner = subprocess.Popen([sys.executable, "-c", EMBEDDED], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        address, mode, token = owner.stdout.readline().split()
        assert mode == "token" and len(token) >= 32
        (tmp_path / "stranger").mkdir()
        stranger = subprocess.run([sys.executable, "-c", TOKEN_CLIENT, address], capture_output=True, text=True,
                                  timeout=120, env=env | {"RAY_AUTH_MODE": "token", "HOME": str(tmp_path / "stranger")})
        assert stranger.stdout.startswith("refused"), stranger.stdout + stranger.stderr[-2000:]
        friend = subprocess.run([sys.executable, "-c", TOKEN_CLIENT, address], capture_output=True, text=True,
                                timeout=120, env=env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        assert friend.stdout.startswith("connected"), friend.stdout + friend.stderr[-2000:]
    finally:
        owner.communicate("\n", timeout=60)


LINGER = "import atexit, runpy, sys; atexit.register(sys.stdin.readline); sys.argv = sys.argv[1:]; " \
         "runpy.run_path(sys.argv[0], run_name='__main__')"


def test_ctrl_c_after_the_summary_keeps_status_0(ray_local, smoke_overrides, tmp_path):
    """Ctrl-C that lands after a finished sweep printed its summary (the process held open at exit until the signal
    is in): the status stays 0, the signal is said to be too late, and the record is FINISHED."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-c", LINGER, SWEEP, "--smoke-test", "--num-samples", "2", "--name", "late",
           "--address", ray_local.get_runtime_context().gcs_address, "--storage-path", str(tmp_path / "rr"),
           "--tracking-uri", uri, "--experiment", "sweeps", f"data.cache_dir={smoke_overrides['data.cache_dir']}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    summary = []
    while not summary or "MLflow parent run" not in summary[-1]:
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=60)[1][-3000:]
        summary.append(line)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(input="\n", timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGINT arrived after the work was finished and recorded" in err, err[-3000:]
    assert "the sweep is saved" not in err
    (parent,), children = runs_of(uri, "sweeps")
    assert parent.info.status == "FINISHED" and len(children[parent.info.run_id]) == 2
    _never_running(uri)


def test_a_tune_run_gives_the_process_its_signal_handlers_back(ray_local, tmp_path):
    """Tune installs SIGINT and SIGUSR1 handlers for a run and leaves them: a later Ctrl-C would only set Tune's
    spent event. After `fit_tuner` the process has its own handlers again."""
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGUSR1)}

    def make_tuner():
        return tune.Tuner(lambda config: {"x": 1}, param_space={"a": tune.grid_search([1, 2])},
                          run_config=tune.RunConfig(name="tiny", storage_path=str(tmp_path), verbose=0))

    fit_tuner(str(tmp_path / "tiny"), None, make_tuner, expected=2, resume=False)
    assert {signum: signal.getsignal(signum) for signum in before} == before
