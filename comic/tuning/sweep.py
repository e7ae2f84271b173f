"""The hyperparameter sweep: Optuna (TPE, seeded; the paper's defaults first) + ASHA on `val/map` per epoch under one
MLflow parent run, then optionally the confirmation of the top K configurations over a list of seeds.

The sweep stores its settings and parent run id beside Tune's state (`comic_sweep.json`, on S3 too), so `resume`
needs only the storage path and the name. The trial table, plots and the best configuration: `comic.tuning.results`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import optuna
import yaml
from pyarrow import fs
from ray import tune
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from comic.cli import check_seeds
from comic.config import Config, apply_overrides, from_dict, to_dict
from comic.data.build import ensure_benchmark
from comic.tracking.client import RunTracker
from comic.tracking.provenance import command_line, executable, run_tags
from comic.tracking.run import log_benchmark
from comic.tracking.store import NOTE_TAG, LogTarget, ensure_experiment, resolve_tracking_uri
from comic.tuning import results
from comic.tuning.callbacks import Progress, SettleTrialRuns
from comic.tuning.champion import champion_cell, register_champion
from comic.tuning.cluster import (
    Resources,
    TuneError,
    absolute_storage,
    check_cluster_storage,
    check_resources,
    connect_ray,
    experiment_path,
    is_remote_path,
)
from comic.tuning.runner import METRIC, MODE, fit_tuner, make_run_config, prepare_configs, run_configs, trial_trainable
from comic.tuning.space import Dimension, default_point, method_space, parse_space
from comic.tuning.trial import SweepTrialName, TrialJob

STATE_FILE = "comic_sweep.json"
SETTING = {"setting": True}  # a SweepSpec field logged as a `sweep.*` param: fixed for the sweep's life
OPTUNA_DB = "optuna.db"  # the Optuna study (study name = the sweep's name): `optuna-dashboard sqlite:///...`
EXPERIMENT_NOTE = ("Hyperparameter sweeps of COMIC: Optuna (TPE) proposes, ASHA stops trials early on val/map. One "
                   "parent run per sweep (its trials table, plots and best configuration as artifacts, best/* as "
                   "metrics) with one nested child run per trial (per-epoch val/, test/, train/ curves). Expand a "
                   "parent row in the runs table to see its trials.")
log = logging.getLogger(__name__)


class RestartableOptunaSearch(OptunaSearch):
    """OptunaSearch that tolerates a trial `--restart-errored` runs again, and records ASHA's stops as pruned.

    A rerun trial: Optuna already closed it as failed (an Optuna trial cannot be reopened), so the rerun's results go
    to Tune and MLflow only, not to the sampler; without this, Ray's OptunaSearch raises KeyError on the rerun's
    first result and the sweep dies. A trial that ends before `max_t` epochs without an error was stopped by ASHA:
    Optuna stores it as PRUNED (value: its last reported val/map), as optuna-dashboard expects, not as COMPLETE.
    """

    def __init__(self, *args: Any, max_t: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_t = max_t

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials:
            log.info("trial %s was restarted after an error; Optuna counted it as failed and does not learn from "
                     "its rerun", trial_id)
        elif not error and result and int(result.get("epoch", self._max_t)) < self._max_t \
                and trial_id not in self._completed_trials:
            trial = self._ot_trials[trial_id]
            # Tune hands the searcher no result that its scheduler stops on: report that last one here, so the
            # pruned trial has its value (Optuna takes a pruned trial's last intermediate value).
            try:  # as Ray does: a trial the study already closed (a resume replaying its end) is only logged
                trial.report(float(result[self.metric]), int(result[TRAINING_ITERATION]))
                self._ot_study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            except (RuntimeError, ValueError) as err:
                log.warning("Optuna trial of %s: %s", trial_id, err)
            self._completed_trials.add(trial_id)
        else:
            super().on_trial_complete(trial_id, result, error)


def optuna_storage(spec: SweepSpec) -> str | None:
    """The SQLite URL of the sweep's Optuna study (beside Tune's state), or None when that storage is remote (an
    SQLite file cannot live on S3 / GCS: the study then stays in memory, inside Tune's searcher checkpoint)."""
    if is_remote_path(spec.path):
        return None
    return f"sqlite:///{Path(spec.path) / OPTUNA_DB}"


def dashboard_command(storage: str) -> str:
    return f"{executable('optuna-dashboard')} {storage}"


@dataclass
class SweepSpec:
    """A TPE + ASHA sweep: the base config, the space, the budget and where it runs and logs."""

    base: Config
    space: dict[str, Dimension] = field(default_factory=dict)  # empty: the method's own (`method_space`)
    num_samples: int = field(default=12, metadata=SETTING)
    seed: int = field(default=0, metadata=SETTING)
    grace_period: int = field(default=2, metadata=SETTING)
    reduction_factor: int = field(default=2, metadata=SETTING)
    resources: Resources = field(default_factory=Resources, metadata=SETTING)
    max_failures: int = field(default=1, metadata=SETTING)
    storage_path: str = ""  # where the sweep is: not saved in it
    name: str = ""
    tracking_uri: str | None = None
    experiment: str = "comic-sweep"
    shared_storage: bool = False
    confirm_top: int = 0
    confirm_seeds: tuple[int, ...] = (0, 1, 2)
    register_model: str = ""  # with confirm_top: register the confirmed best's model under this name ('' = no)
    nested_under: str = ""  # the MLflow run id the sweep's own run nests under ('' = top level; a tuned study's)

    def __post_init__(self) -> None:
        if not self.space:
            self.space = method_space(self.base)

    def check(self) -> None:
        if self.num_samples < 1:
            raise TuneError(f"num_samples={self.num_samples}: must be >= 1 (--num-samples)")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise TuneError("grace_period must be >= 1 and reduction_factor >= 2 (--grace-period, --reduction-factor)")
        if self.confirm_top < 0:
            raise TuneError(f"--confirm-top {self.confirm_top}: must be >= 0")
        check_seeds(self.confirm_seeds)

    @property
    def log_to(self) -> LogTarget:
        """Where the sweep's run is logged (under `nested_under`, if set); the tracking URI resolved by `resolved`."""
        return LogTarget(self.tracking_uri or "", self.experiment, self.nested_under)

    @property
    def path(self) -> str:
        """The Tune experiment directory of this sweep."""
        return experiment_path(self.storage_path, self.name)


@dataclass
class SweepResult:
    """What a finished sweep leaves: one row per trial, the best one, and the confirmation summary (if asked)."""

    name: str
    experiment_path: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: Config | None
    best_config_path: str | None = None
    confirm: list[dict[str, Any]] = field(default_factory=list)
    experiment_id: str = ""
    optuna_storage: str | None = None  # where `optuna.load_study(study_name=name, storage=...)` finds the search
    registered_model: str | None = None  # `models:/NAME@champion` of the confirmed best's model


def resolved(spec: SweepSpec) -> SweepSpec:
    """`spec` checked, with its name (default sweep-<time>), absolute storage path and tracking URI fixed."""
    spec.check()
    name = spec.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    return replace(spec, name=name, storage_path=absolute_storage(spec.storage_path),
                   tracking_uri=resolve_tracking_uri(spec.tracking_uri))


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """Every field of `spec` but where it is stored (its path and name), as JSON values: the base config and the space
    through their own converters."""
    state = {f.name: getattr(spec, f.name) for f in fields(spec) if f.name not in ("storage_path", "name")}
    return state | {"base": to_dict(spec.base), "space": {k: d.describe() for k, d in spec.space.items()},
                    "resources": asdict(spec.resources), "confirm_seeds": list(spec.confirm_seeds)}


def spec_from_dict(state: dict[str, Any], storage_path: str, name: str) -> SweepSpec:
    """The inverse of `spec_to_dict` (keys that are no field, as the saved run id, are left out; a missing base or
    space raises KeyError)."""
    known = {f.name for f in fields(SweepSpec)}
    values = {k: v for k, v in state.items() if k in known} | {"storage_path": storage_path, "name": name}
    if "confirm_seeds" in values:  # a JSON list; older state files have none (the dataclass default then)
        values["confirm_seeds"] = tuple(values["confirm_seeds"])
    return SweepSpec(**values | {"base": from_dict(state["base"]), "space": parse_space(state["space"]),
                                 "resources": Resources(**state["resources"])})


def _save_state(spec: SweepSpec, parent_run_id: str) -> None:
    """The sweep's settings and parent run next to Tune's state (on S3 too): `resume` needs only the path."""
    state = {"parent_run_id": parent_run_id, **spec_to_dict(spec)}
    filesystem, path = fs.FileSystem.from_uri(spec.path)
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(f"{path}/{STATE_FILE}") as out:
        out.write(json.dumps(state, indent=2, default=str).encode())


def load_sweep(storage_path: str | None, name: str | None = None) -> tuple[SweepSpec, str]:
    """The saved spec and parent run id of sweep `name` (default: the latest one in a local storage path)."""
    storage = absolute_storage(storage_path)
    name = name or _latest_sweep(storage)
    location = f"{experiment_path(storage, name)}/{STATE_FILE}"
    filesystem, path = fs.FileSystem.from_uri(location)
    try:
        with filesystem.open_input_stream(path) as fh:
            state = json.loads(fh.read().decode())
        return spec_from_dict(state, storage, name), state["parent_run_id"]
    except FileNotFoundError as err:
        raise TuneError(f"no sweep to resume at {experiment_path(storage, name)} (no {STATE_FILE}); check "
                        "--storage-path and --name") from err
    except (ValueError, KeyError, TypeError) as err:  # truncated JSON, a missing or mistyped setting
        what = f"missing {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise TuneError(f"the sweep state {location} is damaged ({what}); restore the file, or start a new sweep "
                        "with another --name") from err


def _latest_sweep(storage: str) -> str:
    if is_remote_path(storage):
        raise TuneError(f"give the sweep's --name to resume it from {storage}")
    found = sorted(Path(storage).glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise TuneError(f"no sweep to resume in {storage}; check --storage-path")
    return found[-1].parent.name


def run_sweep(spec: SweepSpec, *, resume: bool = False, restart_errored: bool = False,
              callbacks: Sequence[Any] = ()) -> SweepResult:
    """Run (or with `resume`, continue) an Optuna TPE + ASHA sweep under one MLflow parent run; then, if
    `spec.confirm_top`, rerun the best configs over `spec.confirm_seeds` without early stopping. A resume retries
    errored trials from their last checkpoint, or with `restart_errored` from scratch (a checkpoint that cannot be
    read).

    Connects to Ray first if needed (see `connect_ray`). Raises TuneInterrupted when stopped before the end
    (the parent run ends KILLED; `resume=True` with the same storage path and name continues it).
    """
    spec = resolved(spec)
    connect_ray()
    check_resources(spec.resources)
    check_cluster_storage(spec.storage_path, spec.tracking_uri, spec.shared_storage)
    parent_id = _parent_for(spec, resume)
    spec = replace(spec, base=prepare_configs([spec.base])[0])
    experiment_id = ensure_experiment(spec.tracking_uri, spec.experiment, EXPERIMENT_NOTE)
    tags = run_tags({"sweep.name": spec.name, "sweep.path": spec.path, "sweep.kind": "optuna-tpe+asha",
                     NOTE_TAG: _parent_note(spec)})
    with RunTracker(spec.tracking_uri, spec.experiment, run_name=spec.name, run_id=parent_id, tags=tags,
                    parent_run_id=spec.nested_under or None) as parent:
        if parent_id is None:
            _save_state(spec, parent.run_id)
        results.log_inputs(parent, _settings(spec), spec.space, spec.base)
        log_benchmark(parent, ensure_benchmark(spec.base.data))
        grid = _search(spec, parent.run_id, resume, restart_errored, callbacks)
        rows = results.trial_rows(grid, spec.space, spec.base.train.epochs)
        best = results.best_row(grid, rows)
        best_config = apply_overrides(spec.base, {k: best[k] for k in spec.space}) if best else None
        results.log_results(parent, spec.space, rows, best, best_config)
        best_path = _save_best(spec, best_config) if best_config else None
        confirm, registered = _confirm(spec, rows, parent, experiment_id) if spec.confirm_top else ([], None)
    return SweepResult(spec.name, spec.path, spec.tracking_uri, spec.experiment, parent.run_id, rows, best,
                       best_config, best_path, confirm, experiment_id, optuna_storage(spec), registered)


def _parent_note(spec: SweepSpec) -> str:
    return (f"Sweep `{spec.name}`: {spec.num_samples} trials of {spec.base.method} on {spec.base.data.benchmark} "
            f"over {', '.join(spec.space)}; up to {spec.base.train.epochs} epochs, ASHA grace period "
            f"{spec.grace_period}. Tune state: {spec.path}. Made by: `{command_line()}`")


def _settings(spec: SweepSpec) -> dict[str, Any]:
    """The `sweep.*` params: the metric, the epochs (ASHA's max_t) and every SETTING field, resources flattened."""
    out: dict[str, Any] = {"metric": f"{METRIC} ({MODE})", "max_t": spec.base.train.epochs}
    for f in fields(spec):
        if f.metadata.get("setting"):
            value = getattr(spec, f.name)
            out |= asdict(value) if isinstance(value, Resources) else {f.name: value}
    return out


def _save_best(spec: SweepSpec, best_config: Config) -> str:
    """The best configuration, in full, beside the sweep's Tune state: `train.py --config` takes it as is."""
    path = f"{spec.path}/best_config.yaml"
    filesystem, fs_path = fs.FileSystem.from_uri(path)
    with filesystem.open_output_stream(fs_path) as out:
        out.write(yaml.safe_dump(to_dict(best_config), sort_keys=False).encode())
    return path


def _parent_for(spec: SweepSpec, resume: bool) -> str | None:
    """The parent run id to reattach on resume; a new sweep must not reuse an existing experiment directory."""
    filesystem, state = fs.FileSystem.from_uri(f"{spec.path}/{STATE_FILE}")
    saved = filesystem.get_file_info(state).type.name != "NotFound"
    if resume:
        if not saved:
            raise TuneError(f"nothing to resume at {spec.path}; run without --resume to start this sweep")
        return load_sweep(spec.storage_path, spec.name)[1]
    if saved or tune.Tuner.can_restore(spec.path):
        raise TuneError(f"sweep {spec.name!r} already exists at {spec.path}: add --resume to continue it, or pick "
                        "another --name")
    return None


def _open_storage(spec: SweepSpec) -> optuna.storages.RDBStorage | None:
    url = optuna_storage(spec)
    if url is None:
        log.info("the Optuna study stays in memory: %s is remote", spec.path)
        return None
    Path(spec.path).mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url)


def asha_rungs(max_t: int, grace_period: int, reduction_factor: float) -> tuple[int, ...]:
    """The epochs at which ASHA (one bracket) may stop a trial: grace_period * rf^k below max_t, as Ray's bracket
    lays them out. A checkpoint there keeps a stopped trial's best weights."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return tuple(int(grace_period * reduction_factor ** k) for k in range(count))


def _search(spec: SweepSpec, parent_run_id: str, resume: bool, restart_errored: bool,
            callbacks: Sequence[Any]) -> tune.ResultGrid:
    epochs = spec.base.train.epochs
    grace = min(spec.grace_period, epochs)
    job = TrialJob(spec.log_to.under(parent_run_id), "search", base=to_dict(spec.base),
                   checkpoint_epochs=asha_rungs(epochs, grace, spec.reduction_factor))
    trainable = trial_trainable(job, spec.resources)
    point = default_point(spec.space, spec.base)
    all_callbacks = [SettleTrialRuns(job), Progress(job, METRIC, tuple(spec.space)), *callbacks]

    def make_tuner() -> tune.Tuner:
        searcher = RestartableOptunaSearch(points_to_evaluate=[point] if point else None, seed=spec.seed, max_t=epochs,
                                           study_name=spec.name, storage=_open_storage(spec))
        # The epoch is ASHA's clock; a trial that reaches its last epoch is never stopped there (stop_last_trials).
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=grace,
                                  reduction_factor=spec.reduction_factor, stop_last_trials=False)
        config = tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                 num_samples=spec.num_samples, trial_name_creator=SweepTrialName(),
                                 max_concurrent_trials=spec.resources.max_concurrent or None)
        return tune.Tuner(trainable, param_space={k: d.to_tune() for k, d in spec.space.items()}, tune_config=config,
                          run_config=make_run_config(spec.name, spec.storage_path, spec.max_failures, all_callbacks))

    return fit_tuner(spec.path, trainable, make_tuner, expected=spec.num_samples, resume=resume,
                     restart_errored=restart_errored)


def _confirm(spec: SweepSpec, rows: list[dict[str, Any]], parent: RunTracker,
             experiment_id: str) -> tuple[list[dict[str, Any]], str | None]:
    """Rerun the top `confirm_top` configs over `confirm_seeds` (no early stopping) and summarize them; with
    `spec.register_model`, every confirmation run logs its model and the champion's is registered (its URI
    returned)."""
    ranked = sorted((r for r in rows if r["state"] != "errored" and math.isfinite(r[METRIC])),
                    key=lambda r: -r[METRIC])[:spec.confirm_top]
    configs, names, tags, ranks = [], [], [], []
    for rank, row in enumerate(ranked, 1):
        for seed in spec.confirm_seeds:
            configs.append(apply_overrides(spec.base, {k: row[k] for k in spec.space} | {"seed": seed}))
            names.append(f"top{rank}-seed{seed}")
            tags.append({"confirm.rank": str(rank), "confirm.source_trial": row["trial"], "sweep.phase": "confirm"})
            ranks.append(rank)
    parent.set_tags({"confirm.top": str(spec.confirm_top), "confirm.seeds": " ".join(map(str, spec.confirm_seeds))})
    metrics = run_configs(configs, names=names, storage_path=spec.storage_path, name=confirm_name(spec),
                          log_to=spec.log_to.under(parent.run_id), resources=spec.resources,
                          max_failures=spec.max_failures, resume=True, tags=tags,
                          shared_storage=spec.shared_storage, log_models=bool(spec.register_model))
    summary = results.summarize_confirm(ranked, ranks, metrics, spec.space)
    results.log_confirm(parent, summary, spec.space)
    cell = champion_cell(summary, ranks, metrics) if spec.register_model else None
    if cell is None:
        return summary, None
    return summary, register_champion(parent, experiment_id, names[cell], metrics[cell], spec.register_model,
                                      spec.name)


def confirm_name(spec: SweepSpec) -> str:
    """The confirmation's Tune experiment: its settings are in the name, so a resume with other ones starts a new
    confirmation instead of mixing them."""
    return f"{spec.name}-confirm-top{spec.confirm_top}-seeds{'-'.join(map(str, spec.confirm_seeds))}"
