"""The driver's Tune callbacks: the MLflow state of every trial's run, and one console line per trial event.

Both live at module level because Tune pickles callbacks into the experiment directory and unpickles them on
`Tuner.restore`. How a trial ended comes from Tune itself: `on_trial_complete` (it ran all its epochs, or the
scheduler stopped it early), `on_trial_error` (it failed for good), and `on_experiment_end` for the trials that were
still running when the driver stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunTag
from ray import tune
from ray.tune.experiment import Trial

from comic.tracking import store
from comic.tracking.client import ERROR_TAG, truncate
from comic.tuning.trial import RUN_ID_KEY, STATE_TAG, TRIAL_TAG, TrialJob, find_trial_run, find_trial_runs

log = logging.getLogger(__name__)
LONG_EPOCH_S = 20.0  # epochs at least this long get a console line each


def trial_state(job: TrialJob, trial: Trial) -> str:
    """'completed' when a trial Tune ended ran all its planned epochs, else 'early-stopped' (by the scheduler)."""
    epochs = int((trial.last_result or {}).get("epoch", 0))
    return "completed" if epochs >= job.planned_epochs(trial.config) else "early-stopped"


class SettleTrialRuns(tune.Callback):
    """Closes each trial's MLflow child run with the state Tune knows, from the driver.

    Tune ends a stopped trial (ASHA, Ctrl-C) inside `tune.report` and may kill its process before the trial's own
    `with RunTracker(...)` exits, and a crashed worker never exits it; so the driver settles every child run:
    completed -> FINISHED; early-stopped -> FINISHED + `early_stopped=true` and the epoch; errored for good ->
    FAILED + the error; still running when the sweep was interrupted -> KILLED (a resumed trial reattaches).
    """

    def __init__(self, job: TrialJob) -> None:
        self.job = job
        self.log_to = job.log_to

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        state = trial_state(self.job, trial)
        if state == "completed":
            self._close(trial, "FINISHED", {STATE_TAG: state})
        else:
            epoch = str(int((trial.last_result or {}).get("epoch", 0)))
            self._close(trial, "FINISHED", {STATE_TAG: state, "early_stopped": "true", "stopped_at_epoch": epoch})

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._close(trial, "FAILED", {STATE_TAG: "errored", ERROR_TAG: _error_text(trial)})

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # Every trial that ended got its final state tag in on_trial_complete / on_trial_error (in this session or an
        # earlier one). A run without one belongs to a trial that was running when the driver stopped; Tune has
        # stopped it by now (its run detached) and counts it as TERMINATED, but it is unfinished: KILLED until a
        # resume reattaches to it.
        try:
            client = self._client()
            ids = {trial.trial_id for trial in trials}
            for run in find_trial_runs(client, self.log_to.experiment, self.log_to.parent_run_id):
                if run.data.tags.get(TRIAL_TAG) in ids and run.data.tags.get(STATE_TAG, "interrupted") == "interrupted":
                    self._settle(client, run, "KILLED", {STATE_TAG: "interrupted"})
        except Exception:
            log.exception("could not mark the interrupted trials' MLflow runs KILLED")

    def _client(self) -> MlflowClient:
        return store.client(self.log_to.tracking_uri)

    def _close(self, trial: Trial, status: str, tags: dict[str, str]) -> None:
        """Never raises: a tracking hiccup must not stop the sweep (the Tune directory stays the source of truth)."""
        try:
            client = self._client()
            run_id = (trial.last_result or {}).get(RUN_ID_KEY)
            run = client.get_run(run_id) if run_id else find_trial_run(client, self.log_to.experiment,
                                                                       self.log_to.parent_run_id, trial.trial_id)
            if run is not None:
                self._settle(client, run, status, tags)
        except Exception:
            log.exception("could not settle the MLflow run of trial %s", trial.trial_id)

    @staticmethod
    def _settle(client: MlflowClient, run: Any, status: str, tags: dict[str, str]) -> None:
        if ERROR_TAG in run.data.tags:  # the trial recorded its own error, with the traceback in error.txt
            tags = {k: v for k, v in tags.items() if k != ERROR_TAG}
        client.log_batch(run.info.run_id, tags=[RunTag(k, truncate(v)) for k, v in tags.items()], synchronous=True)
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
    """One console line per trial event instead of Tune's tables (one column per metric would be unreadable), and
    one per epoch of a trial whose epochs take LONG_EPOCH_S or more (so a long trial shows it is alive)."""

    def __init__(self, job: TrialJob, metric: str, params: tuple[str, ...] = ()) -> None:
        self.job = job
        self.metric = metric
        self.params = params

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        shown = " ".join(f"{k}={_short(trial.config.get(k))}" for k in self.params if k in trial.config)
        log.info("%s started %s", self._name(trial), shown)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any],
                        **info: Any) -> None:
        if result.get("perf/epoch_s", 0.0) >= LONG_EPOCH_S:
            log.info("%s epoch %d/%d: %s %s, %.0f img/s", self._name(trial), int(result.get("epoch", 0)),
                     self.job.planned_epochs(trial.config), self.metric, _short(result.get(self.metric)),
                     result.get("perf/img_per_s", float("nan")))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        result = trial.last_result or {}
        state = "completed" if trial_state(self.job, trial) == "completed" else "stopped early by ASHA"
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
