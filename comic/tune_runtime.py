"""The parts of a sweep that run under Ray: the trial function, ASHA by epoch, and the driver-side callbacks.

This module imports Ray at the top; `comic.tune` imports it only when a Tuner is about to run, so `import comic.tune`
stays light. Classes live at module level because Tune pickles the scheduler and the callbacks into the experiment
directory and unpickles them on `Tuner.restore`.
"""

from __future__ import annotations

import atexit
import logging
import math
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from comic.config import Config, apply_overrides, from_dict

log = logging.getLogger(__name__)

# Extra keys each trial reports to Tune beside fit's metrics (never logged to MLflow).
PLANNED_KEY = "epochs_planned"
FINAL_KEY = "final_report"
RUN_ID_KEY = "mlflow_run_id"
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

    tracking_uri: str
    experiment: str
    parent_run_id: str | None
    phase: str
    base: dict[str, Any] | None = None
    cells: tuple[dict[str, Any], ...] = ()
    names: tuple[str, ...] = ()
    tags: tuple[dict[str, str], ...] = ()

    def resolve(self, params: dict[str, Any]) -> tuple[Config, str | None, dict[str, str]]:
        """(config, MLflow run name or None for the default, extra tags) of the trial with these params."""
        if self.cells:
            cell = int(params["cell"])
            return from_dict(self.cells[cell]), self.names[cell], dict(self.tags[cell]) if self.tags else {}
        return apply_overrides(from_dict(self.base or {}), params), None, {}


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
    """One trial: `tracked_fit` in a local work dir that travels as the trial's Tune checkpoint.

    Every epoch the work dir (the engine's checkpoint and the MLflow run id) is reported as a `tune.Checkpoint`; a
    trial restored by Tune (a crash under `max_failures`, or `Tuner.restore`) copies it back, so `fit` resumes
    exactly and `tracked_fit` reattaches to the same MLflow run, where already-logged epochs are not logged again.
    """
    from comic.data.benchmark import make_temp_dir, remove_stale_temps
    from comic.session import tracked_fit

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "Checkpoint created" line per epoch otherwise
    cfg, run_name, tags = job.resolve(config)
    context = tune.get_context()
    # A trial Tune stops is killed before its `finally` runs: work dirs carry the pid, so later trials remove those
    # of dead processes.
    remove_stale_temps(Path(tempfile.gettempdir()), WORKDIR_NAME)
    workdir = make_temp_dir(Path(tempfile.gettempdir()), WORKDIR_NAME)
    try:
        _restore_workdir(workdir)
        _adopt_existing_run(workdir, job, context.get_trial_id())
        tags = _placement_tags(context, job.phase) | tags  # the caller's tags (e.g. sweep.phase=confirm) win
        report = _reporter(workdir, cfg, job.tracking_uri)
        result, run_id = tracked_fit(cfg, tracking_uri=job.tracking_uri, experiment=job.experiment, workdir=workdir,
                                     run_name=run_name or context.get_trial_name(),
                                     parent_run_id=job.parent_run_id, report=report, tags=tags)
        # The final metrics (with best/...) reach the driver as one last result; it carries no new checkpoint.
        tune.report(_for_tune(result.metrics, cfg, run_id) | {FINAL_KEY: 1.0})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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
    from mlflow import MlflowClient

    from comic.session import RUN_ID_FILE

    if (workdir / RUN_ID_FILE).is_file():
        return
    run = find_trial_run(MlflowClient(tracking_uri=job.tracking_uri), job.experiment, job.parent_run_id, trial_id)
    if run is not None:
        (workdir / RUN_ID_FILE).write_text(run.info.run_id)
        log.info("trial %s restarts from scratch in its MLflow run %s", trial_id, run.info.run_id)


def find_trial_runs(client: Any, experiment: str, parent_run_id: str | None, trial_id: str | None = None) -> list:
    """The MLflow runs of Tune trials (tag tune.trial_id; only `trial_id`'s if given) under `parent_run_id`."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = f"tags.`{TRIAL_TAG}` = '{trial_id}'" if trial_id else f"tags.`{TRIAL_TAG}` != ''"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    return list(client.search_runs([found.experiment_id], filter_string=query, max_results=5000))


def find_trial_run(client: Any, experiment: str, parent_run_id: str | None, trial_id: str) -> Any:
    """The MLflow run of Tune trial `trial_id` under `parent_run_id`, or None."""
    runs = find_trial_runs(client, experiment, parent_run_id, trial_id)
    return runs[0] if runs else None


def _placement_tags(context: Any, phase: str) -> dict[str, str]:
    return {TRIAL_TAG: context.get_trial_id(), "tune.trial_name": context.get_trial_name(),
            "tune.experiment": context.get_experiment_name(), PHASE_TAG: phase,
            "ray.node_id": ray.get_runtime_context().get_node_id(), "ray.node_ip": ray.util.get_node_ip_address()}


def _reporter(workdir: Path, cfg: Config, tracking_uri: str) -> Callable[[dict[str, float]], None]:
    from comic.session import RUN_ID_FILE

    joined: list[bool] = []

    def report(metrics: dict[str, float]) -> None:
        run_id = (workdir / RUN_ID_FILE).read_text().strip()
        if not joined and threading.current_thread() is not threading.main_thread():
            # Ray ends a stopped trial's process without waiting for this (training) thread; one still unwinding when
            # the interpreter finalizes aborts with a C++ stack dump. Registered after the run's own atexit safety
            # net, this runs before it and lets the thread close its run and work dir first.
            atexit.register(threading.current_thread().join, THREAD_JOIN_S)
            joined.append(True)
        try:
            tune.report(_for_tune(metrics, cfg, run_id), checkpoint=tune.Checkpoint.from_directory(str(workdir)))
        except SystemExit:
            # Tune stops a trial by raising SystemExit(0) in here, which would end the run FINISHED. Right for an
            # ASHA stop (the driver tagged the run early-stopped before stopping it); when the sweep is interrupted
            # the run must end KILLED, as the driver marks it (whichever of the two writes last).
            if not _stopped_early(tracking_uri, run_id):
                raise KeyboardInterrupt("the sweep was interrupted") from None
            raise

    return report


def _stopped_early(tracking_uri: str, run_id: str) -> bool:
    from mlflow import MlflowClient

    try:
        return MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.tags.get(STATE_TAG) == "early-stopped"
    except Exception:  # unreachable tracking: the driver settles the run anyway
        return False


def _for_tune(metrics: dict[str, float], cfg: Config, run_id: str) -> dict[str, Any]:
    return dict(metrics) | {PLANNED_KEY: float(cfg.train.epochs), RUN_ID_KEY: run_id}


class EpochASHA(AsyncHyperBandScheduler):
    """ASHA with the epoch as its clock that never stops a trial at its last epoch.

    Stopping a trial ends it inside `tune.report`. At the last epoch that saves no compute but would cut off the
    run's final metrics (best/...) and artifacts, so the decision there is always CONTINUE; the trial then ends by
    itself.
    """

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get("epoch", 0) >= result.get(PLANNED_KEY, math.inf):
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


class RunStates(tune.Callback):
    """Closes each trial's MLflow child run with the state Tune knows, from the driver.

    Tune ends a stopped trial (ASHA, Ctrl-C) inside `tune.report` and may kill its process before the trial's own
    `with RunTracker(...)` exits, and a crashed worker never exits it; so the driver settles every child run:
    completed -> FINISHED; early-stopped -> FINISHED + `early_stopped=true` and the epoch; errored for good ->
    FAILED + the error; still running when the sweep was interrupted -> KILLED (a resumed trial reattaches).
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str | None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get(FINAL_KEY):  # not Tune's `done`: Tune sets it on a trial ASHA stops, too
            self._close(trial, "FINISHED", {STATE_TAG: "completed"})
        else:
            epoch = str(int(result.get("epoch", 0)))
            self._close(trial, "FINISHED", {STATE_TAG: "early-stopped", "early_stopped": "true",
                                            "stopped_at_epoch": epoch})

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._close(trial, "FAILED", {STATE_TAG: "errored", "error": _error_text(trial)})

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # Every trial that ended got its final state tag in on_trial_complete / on_trial_error (in this session or an
        # earlier one). A run without one belongs to a trial that was running when the driver stopped; Tune has
        # stopped it by now (its thread may even have closed the run FINISHED) and counts it as TERMINATED, but it is
        # unfinished: KILLED until a resume reattaches to it.
        try:
            client = self._client()
            ids = {trial.trial_id for trial in trials}
            for run in find_trial_runs(client, self.experiment, self.parent_run_id):
                if run.data.tags.get(TRIAL_TAG) in ids and run.data.tags.get(STATE_TAG, "interrupted") == "interrupted":
                    self._settle(client, run, "KILLED", {STATE_TAG: "interrupted"})
        except Exception:
            log.exception("could not mark the interrupted trials' MLflow runs KILLED")

    def _client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _close(self, trial: Trial, status: str, tags: dict[str, str]) -> None:
        """Never raises: a tracking hiccup must not stop the sweep (the Tune directory stays the source of truth)."""
        try:
            client = self._client()
            run_id = (trial.last_result or {}).get(RUN_ID_KEY)
            run = client.get_run(run_id) if run_id else find_trial_run(client, self.experiment, self.parent_run_id,
                                                                       trial.trial_id)
            if run is not None:
                self._settle(client, run, status, tags)
        except Exception:
            log.exception("could not settle the MLflow run of trial %s", trial.trial_id)

    @staticmethod
    def _settle(client: Any, run: Any, status: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if "error" in run.data.tags:  # the trial recorded its own error, with the traceback in error.txt
            tags = {k: v for k, v in tags.items() if k != "error"}
        client.log_batch(run.info.run_id, tags=[RunTag(k, v[:8000]) for k, v in tags.items()], synchronous=True)
        if run.info.status != status:
            client.set_terminated(run.info.run_id, status=status)


def _error_text(trial: Trial) -> str:
    """The last line of the error Tune recorded ('RuntimeError: ...'); Tune writes it to the driver's staging
    directory first and to the storage path later, so the local file is read first."""
    text = ""
    try:
        local = Path(trial.error_file) if trial.error_file else None
        text = local.read_text() if local is not None and local.is_file() else str(trial.get_error() or "")
    except Exception:  # an unreadable error file must not hide the state itself
        log.debug("no error text for trial %s", trial.trial_id, exc_info=True)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:2000] if lines else "trial errored (no error text recorded by Tune)"


class Progress(tune.Callback):
    """One console line per trial event instead of Tune's tables (one column per metric would be unreadable)."""

    def __init__(self, metric: str, params: tuple[str, ...] = ()) -> None:
        self.metric = metric
        self.params = params

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        shown = " ".join(f"{k}={_short(trial.config.get(k))}" for k in self.params if k in trial.config)
        log.info("%s started %s", self._name(trial), shown)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        result = trial.last_result or {}
        state = "completed" if result.get(FINAL_KEY) else "stopped early by ASHA"
        value = result.get(f"best/{self.metric}", result.get(self.metric))
        log.info("%s %s at epoch %d, %s %s  [%s]", self._name(trial), state, int(result.get("epoch", 0)),
                 self.metric, _short(value), _counts(trials, trial))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        log.warning("%s errored: %s  [%s]", self._name(trial), _error_text(trial), _counts(trials, trial))

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        log.warning("%s failed and is restarted from its last checkpoint: %s", self._name(trial), _error_text(trial))

    @staticmethod
    def _name(trial: Trial) -> str:
        return trial.custom_trial_name or str(trial)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _counts(trials: list[Trial], ending: Trial) -> str:
    """Progress counts; `ending` (whose status Tune updates after the callbacks) counts as ended."""
    others = [t for t in trials if t is not ending]
    ended = 1 + sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in others)
    running = sum(t.status == Trial.RUNNING for t in others)
    return f"{ended} of {len(trials)} trials ended, {running} running"
