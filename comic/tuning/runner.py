"""Running a Tune experiment of COMIC trials: configs made ready for trials, the Tuner's run config, fit or restore,
and `run_configs` (a plain grid: every config once, no search, no early stopping; the ablations' Ray backend).

The driver does what trials must not each do: it resolves the MLflow tracking URI and the data paths to absolute ones
(Tune changes every trial's working directory), creates the MLflow experiment (SQLite's schema set-up races between
processes), builds each benchmark once, and opens the parent run; trials are child runs of it. A trial that errors for
good (after `max_failures` restarts) is a result, not a crash: its run is FAILED, and `run_configs` returns `{}` for
it (logged at ERROR level).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyarrow import fs as pa_fs
from ray import tune
from ray.tune.experiment import Trial

from comic._io import stable_hash
from comic.config import Config, absolute_paths, apply_overrides, to_dict
from comic.data.build import ensure_benchmark
from comic.data.features import prepare_features
from comic.tracking.store import LogTarget, ensure_experiment
from comic.tuning.callbacks import Progress, SettleTrialRuns
from comic.tuning.cluster import (
    Resources,
    TuneError,
    TuneInterrupted,
    absolute_storage,
    check_cluster_storage,
    check_resources,
    connect_ray,
    experiment_path,
)
from comic.tuning.trial import TrialJob, comic_trial

log = logging.getLogger(__name__)

METRIC = "val/map"
MODE = "max"


def prepare_configs(configs: Sequence[Config]) -> list[Config]:
    """Copies ready for trials: absolute data paths (trials run in other directories), no progress bars, and each
    distinct benchmark (and, profile frozen, its trunk-feature cache) built here once, before any trial starts:
    trials find them by their content hash."""
    built: set[str] = set()
    out = []
    for cfg in configs:
        ready = absolute_paths(apply_overrides(cfg, {"engine.progress": False}))
        key = stable_hash(to_dict(ready)["data"] | {"model": to_dict(ready)["model"]})
        if key not in built:
            ensure_benchmark(ready.data)
            if ready.model.profile == "frozen":
                prepare_features(ready)
            built.add(key)
        out.append(ready)
    return out


def make_run_config(name: str, storage_path: str, max_failures: int, callbacks: Sequence[Any]) -> tune.RunConfig:
    """Tune's run config: no console tables (our `Progress` lines instead), restarts, one checkpoint kept."""
    return tune.RunConfig(name=name, storage_path=storage_path, verbose=0, callbacks=list(callbacks),
                          failure_config=tune.FailureConfig(max_failures=max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1))


def trial_trainable(job: TrialJob, resources: Resources) -> Any:
    """`comic_trial` with the job shipped once through the object store and the per-trial resources."""
    return tune.with_resources(tune.with_parameters(comic_trial, job=job), resources.as_ray())


def fit_tuner(path: str, trainable: Any, make_tuner: Callable[[], tune.Tuner], *, expected: int, resume: bool,
              restart_errored: bool = False) -> tune.ResultGrid:
    """Fit a new Tuner, or restore the one at `path` (finished trials are kept, never re-run); `make_tuner()` builds
    a new one. A new run refuses an existing experiment: Tune would mix two runs in one directory. On restore,
    errored trials resume from their last checkpoint, or with `restart_errored` start afresh.

    Raises TuneInterrupted when the run stopped early (Ctrl-C, SIGUSR1, SIGTERM): fewer than `expected` trials, or a
    trial that Tune's saved state does not show as ended. Tune returns normally then, and marks the trials it stopped
    as terminated in memory only; the state it saved before stopping them is the truth."""
    exists = tune.Tuner.can_restore(path)
    if exists and not resume:
        raise TuneError(f"a Tune experiment already exists at {path}: resume it (--resume / resume=True) or choose "
                        "another name (--name)")
    if exists:
        check_tune_state(path)
        log.info("resuming the Tune experiment at %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=not restart_errored, restart_errored=restart_errored)
    else:
        tuner = make_tuner()
    with _signal_handlers_kept():
        grid = tuner.fit()
    saved = tune.ExperimentAnalysis(path).trials
    if len(saved) < expected or any(t.status not in (Trial.TERMINATED, Trial.ERROR) for t in saved):
        raise TuneInterrupted(path)
    return grid


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Tune installs its own SIGINT and SIGUSR1 handlers for a run and leaves them behind when the run ends: a later
    Ctrl-C would only set Tune's spent event, and `comic.progress.sigterm_as_interrupt` would take Tune for running.
    The process's own handlers come back after the run (main thread only: handlers belong to it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGUSR1)}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def check_tune_state(path: str) -> None:
    """Refuse a Tune experiment whose newest state file is damaged, naming it (Tune's own error would be a
    misleading 'no search space has been defined')."""
    filesystem, folder = pa_fs.FileSystem.from_uri(path)
    found = filesystem.get_file_info(pa_fs.FileSelector(folder))
    states = sorted((f for f in found if f.base_name.startswith("experiment_state") and f.base_name.endswith(".json")),
                    key=lambda f: f.base_name)
    if not states:
        return
    newest = states[-1]
    try:
        with filesystem.open_input_stream(newest.path) as fh:
            json.loads(fh.read().decode())
    except (OSError, ValueError) as err:
        raise TuneError(f"the Tune state file {newest.path} is damaged ({type(err).__name__}: {err}); delete it to "
                        "resume from the state before it, if there is one, or start a new sweep with another --name"
                        ) from err


def run_configs(configs: list[Config], *, names: list[str], storage_path: str, name: str, log_to: LogTarget,
                resources: Resources, max_failures: int = 1,
                resume: bool = False, tags: list[dict[str, str]] | None = None, shared_storage: bool = False,
                callbacks: Sequence[Any] = (), log_models: bool = False) -> list[dict[str, float]]:
    """Run every config once as a Tune trial (a grid, no search, no early stopping), each a child MLflow run.

    Trial i is MLflow run `names[i]` under `log_to.parent_run_id` (top level if '') with extra `tags[i]`. A crashed
    trial restarts from its last epoch checkpoint up to `max_failures` times. `resume=True` continues the Tune
    experiment `storage_path/name` if there is one (finished trials are kept; errored ones resume from their last
    checkpoint) and starts it otherwise; `resume=False` refuses an existing one. Returns each config's final
    metrics (`FitResult.metrics`, with best/...) in input order; `{}` for a trial that errored for good (logged at
    ERROR level; its run is FAILED). Raises TuneInterrupted when the run was interrupted (resume to continue).
    `callbacks`: extra Tune callbacks (on the driver). `log_models`: every trial logs its best-on-val model.
    """
    if len(names) != len(configs) or (tags is not None and len(tags) != len(configs)):
        raise ValueError(f"{len(configs)} configs need as many names ({len(names)}) and tags "
                         f"({'none' if tags is None else len(tags)})")
    connect_ray()
    check_resources(resources)
    storage = absolute_storage(storage_path)
    check_cluster_storage(storage, log_to.tracking_uri, shared_storage)
    ensure_experiment(log_to.tracking_uri, log_to.experiment)
    job = TrialJob(log_to, "grid", cells=tuple(to_dict(c) for c in prepare_configs(configs)),
                   names=tuple(names), tags=tuple(dict(t) for t in tags or ()), log_models=log_models)
    trainable = trial_trainable(job, resources)
    all_callbacks = [SettleTrialRuns(job), Progress(job, METRIC), *callbacks]

    def make_tuner() -> Any:
        return tune.Tuner(trainable, param_space={"cell": tune.grid_search(list(range(len(configs))))},
                          tune_config=tune.TuneConfig(max_concurrent_trials=resources.max_concurrent or None,
                                                      trial_name_creator=_CellName(tuple(names))),
                          run_config=make_run_config(name, storage, max_failures, all_callbacks))

    grid = fit_tuner(experiment_path(storage, name), trainable, make_tuner, expected=len(configs), resume=resume)
    if len(grid) != len(configs):
        raise TuneError(f"the Tune experiment {experiment_path(storage, name)} holds {len(grid)} trials, not "
                        f"{len(configs)}: resume it with the configs it was started with, or choose another name")
    return _metrics_by_cell(grid, names)


@dataclass(frozen=True)
class _CellName:
    """Tune trial name = the caller's name of the cell (a class, not a lambda: Tune pickles it with the run)."""

    names: tuple[str, ...]

    def __call__(self, trial: Any) -> str:
        return self.names[int(trial.config["cell"])]


def fit_metrics(result_metrics: Mapping[str, Any]) -> dict[str, float]:
    """fit's metrics from a Tune result: `epoch` and the flat `a/b` names, without Tune's own bookkeeping keys."""
    return {k: float(v) for k, v in result_metrics.items()
            if (k == "epoch" or "/" in k) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _metrics_by_cell(grid: Any, names: Sequence[str]) -> list[dict[str, float]]:
    out: list[dict[str, float]] = [{} for _ in names]
    for result in grid:
        cell = int(result.config["cell"])
        if result.error is not None:
            lines = str(result.error).strip().splitlines() or ["(no error text)"]
            log.error("trial %s errored for good: %s", names[cell], lines[-1])
            continue
        out[cell] = fit_metrics(result.metrics)
    return out
