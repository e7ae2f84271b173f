"""The cluster path exercised on one machine: Ray's real autoscaler on `ray_cluster.yaml`'s node types (shrunk: fake
GPUs, `tests/tuning/fake_cluster.py`), a smoke sweep with one GPU per trial that makes it launch workers and remove
them when idle, and a preemption drill: a worker's raylet killed by pid in the middle of a trial.

Shuts the session's local Ray down first (two clusters would fight over 2 cores); the next test that asks for
`ray_local` starts it again. Everything the cluster started is stopped by pid, and checked gone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from fake_cluster import FAKE_HEAD_TYPE, REPO, FakeCluster, fake_config
from mlflow import MlflowClient
from ray.autoscaler._private.util import validate_config
from sweep_helpers import runs_of, steps_of, wait_for

from comic.config import load_config
from comic.engine import fit
from comic.tracking.store import LogTarget
from comic.tuning.cluster import Resources
from comic.tuning.runner import run_configs

YAML = REPO / "ray_cluster.yaml"
SWEEP = str(REPO / "experiments" / "sweep.py")
WORKER = {"CPU": 1, "GPU": 1}  # each worker type's resources, shrunk to this box (fake GPUs; trials run on the CPU)
IDLE_MINUTES = 0.1
# The drill's trial: long enough (0.1 to 0.3 s an epoch here) to be killed in the middle, checkpointed by time.
DRILL = {"train.epochs": 40, "train.checkpoint_every_s": 1.0, "engine.deterministic": True, "engine.threads": 1}
KILL_AFTER_EPOCH = 15
pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")]


def test_the_fake_config_is_the_yamls_node_types_shrunk():
    real = yaml.safe_load(YAML.read_text())
    config = fake_config(YAML, "127.0.0.1:6380", WORKER, IDLE_MINUTES)
    validate_config(config)  # Ray's own schema of an autoscaling config
    workers = set(real["available_node_types"]) - {real["head_node_type"]}
    assert workers and set(config["available_node_types"]) == workers | {FAKE_HEAD_TYPE}
    head = config["available_node_types"][FAKE_HEAD_TYPE]
    assert head["resources"] == real["available_node_types"][real["head_node_type"]]["resources"] == {"CPU": 0}
    for name in workers:
        ours, theirs = config["available_node_types"][name], real["available_node_types"][name]
        assert ours["resources"] == WORKER and "GPU" in theirs["resources"]
        assert (ours["min_workers"], ours["max_workers"]) == (theirs.get("min_workers", 0), theirs["max_workers"])
    assert (config["max_workers"], config["upscaling_speed"]) == (real["max_workers"], real["upscaling_speed"])
    assert config["provider"]["gcs_address"] == "127.0.0.1:6380"


@pytest.fixture
def autoscaling():
    import ray

    ray.shutdown()
    cluster = FakeCluster(lambda address: fake_config(YAML, address, WORKER, IDLE_MINUTES))
    with cluster:
        ray.init(address=cluster.address, logging_level="WARNING")
        try:
            yield cluster
        finally:
            ray.shutdown()
    assert not cluster.pids(), "processes of the fake cluster outlived it"


def _workers(head: str) -> dict[str, dict]:
    import ray

    return {n["NodeID"]: n for n in ray.nodes() if n["NodeID"] != head}


def test_an_autoscaled_sweep_and_a_preempted_worker(autoscaling, mlflow_server, smoke_overrides, tmp_path):
    import ray

    head = ray.get_runtime_context().get_node_id()
    assert not _workers(head)  # min_workers 0: the cluster starts as its head alone
    start, joined = time.monotonic(), {}
    watcher = threading.Thread(target=lambda: joined.setdefault("s", wait_for(
        lambda: _workers(head) and time.monotonic() - start, "a worker node to join", 600)), daemon=True)
    watcher.start()
    cmd = [sys.executable, SWEEP, "--smoke-test", "--num-samples", "2", "--cpus-per-trial", "1", "--gpus-per-trial",
           "1", "--address", autoscaling.address, "--storage-path", str(tmp_path / "rr"), "--shared-storage",
           "--tracking-uri", mlflow_server, "--experiment", "autoscaled", "--name", "autoscaled",
           f"data.cache_dir={smoke_overrides['data.cache_dir']}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=autoscaling.env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sweep_s = time.monotonic() - start
    launched = _workers(head)  # Ray's node table: every node that joined, alive or not
    assert launched, "the autoscaler launched no worker for trials that need a GPU"
    (parent,), children = runs_of(mlflow_server, "autoscaled")
    trials = children[parent.info.run_id]
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}
    placed = Counter(r.data.tags["ray.node_id"] for r in trials)
    assert head not in placed and set(placed) <= set(launched)  # no trial on the head (CPU 0)
    wait_for(lambda: not any(n["Alive"] for n in _workers(head).values()), "idle workers to be removed", 180)
    idle_s = time.monotonic() - start - sweep_s
    drill = _preemption_drill(autoscaling, head, mlflow_server, smoke_overrides, tmp_path)
    print(f"\nautoscaler: {len(launched)} workers launched for the sweep (the first joined {joined['s']:.0f} s after "
          f"the sweep started), trials per node {sorted(placed.values())}, sweep {sweep_s:.0f} s, idle workers gone "
          f"{idle_s:.0f} s later; {drill}")


def _preemption_drill(cluster: FakeCluster, head: str, uri: str, smoke_overrides: dict, tmp_path: Path) -> str:
    """Two trials on two GPU workers; the node running the first is killed (its raylet and every process under it,
    SIGKILL) once that trial logged KILL_AFTER_EPOCH epochs. The trial restarts on another node from its last
    checkpoint, into the same MLflow run, and ends with the metrics of an uninterrupted run."""
    cfg = load_config("synthetic", smoke_overrides | DRILL)
    clean = fit(cfg).metrics
    killed: dict[str, str] = {}
    killer = threading.Thread(target=_kill_node_of, args=(cluster, uri, "drill-seed0", killed), daemon=True)
    killer.start()
    start = time.monotonic()
    metrics = run_configs([cfg, load_config("synthetic", smoke_overrides | DRILL | {"seed": 1})],
                          names=["drill-seed0", "drill-seed1"], storage_path=str(tmp_path / "rr"), name="drill",
                          log_to=LogTarget.at(uri, "drill"), resources=Resources(1, 1), max_failures=2,
                          shared_storage=True)
    wall = time.monotonic() - start
    killer.join(timeout=5)
    assert killed.get("node"), killed.get("error", "the drill never killed a node")
    for key in ("best/val/map", "best/test/map", "val/map", "epoch"):
        assert metrics[0][key] == pytest.approx(clean[key], abs=1e-6), key
    run = MlflowClient(uri).get_run(killed["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["ray.node_id"] != killed["node"]  # restarted elsewhere
    assert steps_of(uri, run.info.run_id) == list(range(1, DRILL["train.epochs"] + 1))  # each epoch logged once
    (results,) = [f for f in (tmp_path / "rr" / "drill").glob("*/result.json")
                  if json.loads(f.read_text().splitlines()[0])["config"]["cell"] == 0]
    first, second = _attempts(results)
    restart = second["epochs"][0] - 1
    assert first["saved"] and restart == first["saved"][-1], (first, second)  # from its last checkpoint
    redone = max(first["epochs"][-1], int(killed["epoch"])) - restart  # the last epoch may be logged, not reported
    per_epoch = sum(first["seconds"]) / len(first["seconds"])
    return (f"drill: a worker node killed after epoch {killed['epoch']}; the trial restarted on another node "
            f"from its epoch-{restart} checkpoint, {redone} epochs redone (checkpoint every "
            f"{DRILL['train.checkpoint_every_s']:g} s, {per_epoch:.2f} s an epoch); wall {wall:.0f} s")


def _kill_node_of(cluster: FakeCluster, uri: str, run_name: str, killed: dict[str, str]) -> None:
    try:
        client = MlflowClient(uri)

        def running_long_enough():
            exp = client.get_experiment_by_name("drill")
            runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{run_name}'") if exp else []
            if runs and len(steps_of(uri, runs[0].info.run_id)) >= KILL_AFTER_EPOCH:
                return runs[0]
            return None

        run = wait_for(running_long_enough, f"{run_name} to log {KILL_AFTER_EPOCH} epochs", 300, 0.2)
        node = run.data.tags["ray.node_id"]
        cluster.kill_node(node)
        killed |= {"node": node, "run_id": run.info.run_id, "epoch": str(len(steps_of(uri, run.info.run_id)))}
    except Exception as err:  # reported by the test's thread
        killed["error"] = f"{type(err).__name__}: {err}"


def _attempts(results: Path) -> list[dict]:
    """Per attempt (one worker process, in order): the epochs it reported to Tune, those with a checkpoint, and
    its seconds per epoch."""
    attempts: dict[int, dict] = {}
    for line in results.read_text().splitlines():
        row = json.loads(line) if line.strip() else None
        if row is not None:
            attempt = attempts.setdefault(row["pid"], {"epochs": [], "saved": [], "seconds": []})
            attempt["epochs"].append(int(row["epoch"]))
            attempt["seconds"].append(float(row["time_this_iter_s"]))
            if row.get("checkpoint_dir_name"):
                attempt["saved"].append(int(row["epoch"]))
    return list(attempts.values())
