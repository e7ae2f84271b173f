"""What the sweep tests share: a small sweep spec, the MLflow runs of an experiment, and signal-sending callbacks that
fire at a chosen trial event (synchronised on Tune's own events, not on sleeps)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from ray import tune

from comic.config import load_config
from comic.tuning.cluster import Resources
from comic.tuning.space import parse_space
from comic.tuning.sweep import SweepSpec

# The sweeps of these tests search COMIC's four method parameters (the registry's space adds rates and weights).
SWEEP_SPACE = {"htb.alpha": [0.5, 4.0], "rlc.tau": [0.5, 0.95], "mfm.gamma_neg": [1.0, 5.0],
               "mfm.gamma_pos": [0.0, 2.0]}


def spec_for(tmp_path: Path, smoke_overrides: dict, **changes) -> SweepSpec:
    overrides = smoke_overrides | changes.pop("overrides", {})
    base = load_config("synthetic", overrides)
    fields = {"base": base, "space": parse_space(SWEEP_SPACE, base), "num_samples": 5, "grace_period": 1,
              "reduction_factor": 2, "resources": Resources(1, 0, 1), "storage_path": str(tmp_path / "ray_results"),
              "name": "sweep", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "sweeps"}
    return SweepSpec(**(fields | changes))


def runs_of(uri: str, experiment: str) -> tuple[list, dict[str, list]]:
    """(top-level runs, {parent run id: child runs}) of an experiment."""
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    children: dict[str, list] = {}
    for run in runs:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            children.setdefault(parent, []).append(run)
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags], children


def steps_of(uri: str, run_id: str, key: str = "val/map") -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def stop_sweep(marker: str) -> None:
    """Tune's graceful stop, as Ctrl-C: SIGUSR1 to this (the driver) process, once (the marker file remembers it;
    Tune restores callbacks with the experiment on resume)."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGUSR1)


class InterruptMidTrial(tune.Callback):
    """Stops the sweep when a trial reports its first epoch after `n` trials have ended: that trial is cut off, before
    Tune registered the epoch's checkpoint (so it restarts from scratch on resume)."""

    def __init__(self, n: int, marker: Path) -> None:
        self.n, self.marker, self.ended = n, str(marker), 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended += 1

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.ended >= self.n and result.get("epoch") == 1:
            stop_sweep(self.marker)


class InterruptAfterCheckpoint(InterruptMidTrial):
    """Stops the sweep when a trial's first-epoch checkpoint arrives after `n` trials have ended: the stop takes
    effect after Tune registered it, so the saved state resumes that trial from this checkpoint."""

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        pass

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        if self.ended >= self.n and trial.last_result.get("epoch") == 1:
            stop_sweep(self.marker)


class InterruptAtStart(tune.Callback):
    """Stops the sweep as soon as its `n`-th trial starts, before it reported anything."""

    def __init__(self, n: int, marker: Path) -> None:
        self.n, self.marker, self.started = n, str(marker), 0

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started += 1
        if self.started == self.n:
            stop_sweep(self.marker)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 120.0, every: float = 0.5) -> Any:
    """Poll `condition` until it returns something truthy (returned); AssertionError naming `what` at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
