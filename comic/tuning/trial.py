"""The trial: one `tracked_fit` run inside Ray Tune, its work directory travelling as the trial's Tune checkpoint.

Every epoch's metrics, best epoch so far included, are reported; the work dir (the engine's checkpoint and the MLflow
run id) goes with them as a `tune.Checkpoint` when the epoch was written (`train.checkpoint_every_s`, the last epoch,
and the epochs where ASHA may stop the trial); a trial restored by Tune (a crash under `max_failures`, or
`Tuner.restore`) copies it back, so `fit` resumes exactly and the same MLflow run continues. When Tune stops a trial
(ASHA, or the sweep interrupted) the run is detached, not closed: the driver knows why it stopped and settles it
(`comic.tuning.callbacks.SettleTrialRuns`).
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow import MlflowClient
from ray import tune
from ray.tune.experiment import Trial

from comic._io import make_temp_dir, remove_stale_temps
from comic.checkpoint import CheckpointError, CheckpointPolicy, RunState
from comic.config import Config, apply_overrides, from_dict
from comic.tracking import store
from comic.tracking.client import ERROR_TAG, PARENT_TAG, truncate
from comic.tracking.run import RUN_ID_FILE, tracked_fit
from comic.tracking.store import LogTarget, search_all_runs

log = logging.getLogger(__name__)

RUN_ID_KEY = "mlflow_run_id"  # reported beside fit's metrics: the driver finds a trial's run by it
# Tags on every child run: how the driver finds a trial's run, and what became of the trial.
TRIAL_TAG = "tune.trial_id"
STATE_TAG = "tune.state"
PHASE_TAG = "sweep.phase"
WORKDIR_NAME = "comic-trial"
THREAD_JOIN_S = 20.0


@dataclass(frozen=True)
class TrialJob:
    """Everything the trials of one Tuner need, shipped once through Ray's object store (`tune.with_parameters`).

    A sweep trial applies its sampled params to `base`; a grid trial takes the full config `cells[config['cell']]`.
    Paths inside the configs are absolute: Tune changes every trial's working directory.
    """

    log_to: LogTarget  # the trials' runs are children of its parent run
    phase: str
    base: dict[str, Any] | None = None
    cells: tuple[dict[str, Any], ...] = ()
    names: tuple[str, ...] = ()
    tags: tuple[dict[str, str], ...] = ()
    checkpoint_epochs: tuple[int, ...] = ()  # besides the time-based ones: where the scheduler may stop a trial
    log_models: bool = False  # each trial logs its best-on-val model as its run's MLflow model

    def resolve(self, params: dict[str, Any]) -> tuple[Config, str | None, dict[str, str]]:
        """(config, MLflow run name or None for the default, extra tags) of the trial with these params."""
        if self.cells:
            cell = int(params["cell"])
            return from_dict(self.cells[cell]), self.names[cell], dict(self.tags[cell]) if self.tags else {}
        return apply_overrides(from_dict(self.base or {}), params), None, {}

    def planned_epochs(self, params: dict[str, Any]) -> int:
        """The epochs a trial with these params runs when nothing stops it (a search never varies them)."""
        tree = self.cells[int(params["cell"])] if self.cells else (self.base or {})
        return int(tree["train"]["epochs"])


def trial_label(experiment_tag: str) -> str:
    """'trial-007' from Tune's experiment tag '7_htb.alpha=...': the creation order (kept across restores), readable
    in MLflow and on the console. Tune's own trial ids are random under a searcher."""
    counter = experiment_tag.split("_", 1)[0]
    return f"trial-{int(counter):03d}" if counter.isdigit() else f"trial-{experiment_tag}"


class SweepTrialName:
    """Tune's `trial_name_creator` for sweeps (a class, not a lambda: Tune pickles it with the experiment)."""

    def __call__(self, trial: Trial) -> str:
        return trial_label(trial.experiment_tag)


def comic_trial(config: dict[str, Any], job: TrialJob) -> None:
    """One trial: `tracked_fit` in a local work dir that is reported as the trial's Tune checkpoint every epoch."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "Checkpoint created" line per epoch otherwise
    cfg, run_name, tags = job.resolve(config)
    context = tune.get_context()
    # A trial Tune stops is killed before its `finally` runs: work dirs carry the pid, so later trials remove those
    # of dead processes.
    remove_stale_temps(Path(tempfile.gettempdir()), WORKDIR_NAME)
    workdir = make_temp_dir(Path(tempfile.gettempdir()), WORKDIR_NAME)
    # Ray ends a stopped trial's process without waiting for this (training) thread; one still unwinding when the
    # interpreter finalizes aborts with a C++ stack dump. Joining it at exit lets it detach its run first.
    atexit.register(threading.current_thread().join, THREAD_JOIN_S)
    try:
        _restore_workdir(workdir)
        _adopt_existing_run(workdir, job, context.get_trial_id())
        tags = _placement_tags(context, job.phase) | tags  # the caller's tags (e.g. sweep.phase=confirm) win
        tracked_fit(cfg, tracking_uri=job.log_to.tracking_uri, experiment=job.log_to.experiment, workdir=workdir,
                    run_name=run_name or context.get_trial_name(), parent_run_id=job.log_to.parent_run_id or None,
                    report=_Reporter(workdir), tags=tags, detach_on_exit=True,
                    policy=CheckpointPolicy.of(cfg, job.checkpoint_epochs), log_model=job.log_models)
    except CheckpointError as err:
        origin = tune.get_checkpoint()
        if origin is None:
            raise
        # The checkpoint was copied into a temporary folder; name Tune's own copy and the way out, in Tune's error
        # and in the run's error tag (which the trial's run wrote with the temporary path).
        named = CheckpointError(f"the checkpoint of trial {context.get_trial_name()} in {origin.path} cannot be read "
                                f"({err.__cause__ or err}); rerun with --resume --restart-errored to start that trial "
                                "afresh")
        _retag_error(workdir, job.log_to.tracking_uri, f"CheckpointError: {named}")
        raise named from err
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _retag_error(workdir: Path, tracking_uri: str, text: str) -> None:
    run_file = workdir / RUN_ID_FILE
    if run_file.is_file():
        store.client(tracking_uri).set_tag(run_file.read_text().strip(), ERROR_TAG, truncate(text))


@dataclass(frozen=True)
class _Reporter:
    """fit's per-epoch report -> `tune.report` (ASHA reads every epoch), with the work dir as the trial's checkpoint
    when the epoch was written to it (Tune may stop the trial in there)."""

    workdir: Path

    def __call__(self, metrics: dict[str, float], run: RunState) -> None:
        run_id = (self.workdir / RUN_ID_FILE).read_text().strip()
        checkpoint = tune.Checkpoint.from_directory(str(self.workdir)) if run.saved else None
        tune.report(dict(metrics) | {RUN_ID_KEY: run_id}, checkpoint=checkpoint)


def _restore_workdir(workdir: Path) -> None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as saved:
        shutil.copytree(saved, workdir, dirs_exist_ok=True)
    log.info("trial restored from %s", checkpoint.path)


def _adopt_existing_run(workdir: Path, job: TrialJob, trial_id: str) -> None:
    """A trial restarted without a checkpoint (interrupted or crashed before Tune registered its first one) continues
    the MLflow run it already has, found by its Tune trial id, instead of opening a second run. Its epochs restart
    from 1; the steps that run already holds are not logged again (a seeded run recomputes the same values)."""
    if (workdir / RUN_ID_FILE).is_file():
        return
    run = find_trial_run(store.client(job.log_to.tracking_uri), job.log_to.experiment, job.log_to.parent_run_id,
                         trial_id)
    if run is not None:
        (workdir / RUN_ID_FILE).write_text(run.info.run_id)
        log.info("trial %s restarts from scratch in its MLflow run %s", trial_id, run.info.run_id)


def find_trial_runs(client: MlflowClient, experiment: str, parent_run_id: str | None,
                    trial_id: str | None = None) -> list:
    """The MLflow runs of Tune trials (tag tune.trial_id; only `trial_id`'s if given) under `parent_run_id`."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = f"tags.`{TRIAL_TAG}` = '{trial_id}'" if trial_id else f"tags.`{TRIAL_TAG}` != ''"
    if parent_run_id:
        query += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    return search_all_runs(client, [found.experiment_id], query)


def find_trial_run(client: MlflowClient, experiment: str, parent_run_id: str | None, trial_id: str) -> Any:
    """The MLflow run of Tune trial `trial_id` under `parent_run_id`, or None."""
    runs = find_trial_runs(client, experiment, parent_run_id, trial_id)
    return runs[0] if runs else None


def _placement_tags(context: Any, phase: str) -> dict[str, str]:
    return {TRIAL_TAG: context.get_trial_id(), "tune.trial_name": context.get_trial_name(),
            "tune.experiment": context.get_experiment_name(), PHASE_TAG: phase,
            "ray.node_id": ray.get_runtime_context().get_node_id(), "ray.node_ip": ray.util.get_node_ip_address()}
