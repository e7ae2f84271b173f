"""Ray Tune orchestration: an Optuna (TPE) + ASHA sweep, and plain grids of configs; every trial is a tracked run.

Ray, Optuna and MLflow are imported inside functions (the Ray-side classes live in `comic.tune_runtime`), so
`import comic.tune` stays light. Decisions the callers rely on:

- The driver does what trials must not each do: it resolves the MLflow tracking URI and the data paths to absolute
  ones (Tune changes every trial's working directory), creates the MLflow experiment (SQLite's schema set-up races
  between processes), builds the benchmark once, and opens the parent run. Trials are child runs of it.
- A trial is `session.tracked_fit` in a local work dir reported as its Tune checkpoint every epoch; a restored trial
  (crash under `max_failures`, or `resume`) continues the same checkpoint and the same MLflow run.
- Run states: the driver-side `tune_runtime.RunStates` callback settles every child run (completed / early-stopped
  / errored / interrupted), because Tune stops trials without letting them close their runs.
- ASHA uses the reported `epoch` as its clock (`training_iteration` would count the final report too) and never stops
  a trial at its last epoch (`tune_runtime.EpochASHA`).
- The Tune experiment directory (`storage_path/name`) is the source of truth, MLflow the view. A sweep stores its
  settings and parent run id there (`comic_sweep.json`), so `resume` needs only the path. On a multi-node cluster a
  local storage path or SQLite tracking URI is refused unless `shared_storage` asserts every node sees that path.
- A trial that errors for good (after `max_failures` restarts) is a result, not a crash of the sweep: its run is
  FAILED with the error, its row says `errored`, and `run_configs` returns `{}` for it (logged at ERROR level).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from comic.config import Config, ConfigError, apply_overrides, field_specs, from_dict, to_dict, to_flat_dict

log = logging.getLogger(__name__)

METRIC = "val/map"
MODE = "max"
STATE_FILE = "comic_sweep.json"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # trials exchange small dicts only; Ray's default would take 30% of RAM
SPACE_KINDS = ("uniform", "loguniform", "int", "choice")
# The default search space: COMIC's HTB exponent, RLC threshold and MFM focusing exponents.
DEFAULT_SPACE: dict[str, Any] = {
    "htb.alpha": {"uniform": [0.5, 4.0]},
    "rlc.tau": {"uniform": [0.5, 0.95]},
    "mfm.gamma_neg": {"uniform": [1.0, 5.0]},
    "mfm.gamma_pos": {"uniform": [0.0, 2.0]},
}
CONFIRM_METRICS = ("best/val/map", "best/test/map", "best/test/map_many", "best/test/map_medium", "best/test/map_few")


class TuneError(RuntimeError):
    """A sweep or grid that cannot run as asked (bad storage, existing experiment, nothing to resume)."""


class TuneInterrupted(KeyboardInterrupt):
    """The Tune run stopped before all trials ended (Ctrl-C / SIGUSR1); its state is saved and can be resumed.

    A KeyboardInterrupt, so a surrounding `RunTracker` block ends its run KILLED, as for any Ctrl-C.
    """

    def __init__(self, path: str) -> None:
        super().__init__(f"the Tune run at {path} was interrupted; its state is saved, resume it to continue")
        self.path = path


@dataclass(frozen=True)
class Resources:
    """Per-trial resources. Fractional GPUs pack trials on one GPU: Ray only divides its bookkeeping, GPU memory is
    not isolated, so the packed trials must fit in memory together."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0 = as many as the cluster's resources allow

    def __post_init__(self) -> None:
        if self.cpus_per_trial <= 0:
            raise ValueError(f"cpus_per_trial={self.cpus_per_trial}: must be > 0")
        if self.gpus_per_trial < 0 or (self.gpus_per_trial > 1 and not float(self.gpus_per_trial).is_integer()):
            raise ValueError(f"gpus_per_trial={self.gpus_per_trial}: use a fraction in (0, 1] or a whole number")
        if self.max_concurrent < 0:
            raise ValueError(f"max_concurrent={self.max_concurrent}: must be >= 0 (0 = no limit)")

    def as_ray(self) -> dict[str, float]:
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}


# --------------------------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Dimension:
    """One searched config key: `uniform` / `loguniform` over [low, high], `int` (inclusive) or `choice`."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # Tune's upper bound is exclusive
        return tune.choice(list(self.choices))

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def describe(self) -> dict[str, list[Any]]:
        return {self.kind: list(self.choices) if self.kind == "choice" else [self.low, self.high]}


def parse_space(raw: Mapping[str, Any], base: Config | None = None) -> dict[str, Dimension]:
    """Dotted config key -> Dimension from `{key: [low, high]}` (uniform) or `{key: {kind: values}}`.

    Kinds: uniform / loguniform / int: [low, high]; choice: [a, b, ...]. With `base`, both bounds (or every choice)
    must be valid values of the key, so a bad range fails here and not in the middle of a sweep.
    """
    if not raw:
        raise ConfigError("the search space is empty; give at least one key, e.g. 'rlc.tau: [0.5, 0.95]'")
    specs = field_specs()
    space = {}
    for key, value in raw.items():
        if key not in specs:
            apply_overrides(Config(), {key: 0})  # raises the unknown-key error naming the closest key
        if key == "train.epochs":
            raise ConfigError("space: train.epochs cannot be searched: it is ASHA's budget (set it in the base config)")
        space[key] = _dimension(key, value)
        if base is not None:
            _check_values(base, key, space[key])
    return space


def _dimension(key: str, value: Any) -> Dimension:
    usage = "expected [low, high] or {uniform|loguniform|int: [low, high]} or {choice: [a, b, ...]}"
    if isinstance(value, (list, tuple)):
        value = {"uniform": list(value)}
    if not (isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in SPACE_KINDS):
        raise ConfigError(f"space: {key}: {usage}; got {value!r}")
    kind, values = next(iter(value.items()))
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"space: {key}: {usage}; got {value!r}")
    if kind == "choice":
        return Dimension("choice", choices=tuple(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"space: {key}: {kind} needs two numbers [low, high]; got {values!r}")
    low, high = float(values[0]), float(values[1])
    if not low < high:
        raise ConfigError(f"space: {key}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"space: {key}: loguniform needs low > 0; got {low}")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"space: {key}: int bounds must be whole numbers; got {values!r}")
    return Dimension(kind, low, high)


def _check_values(base: Config, key: str, dim: Dimension) -> None:
    for value in dim.choices if dim.kind == "choice" else (dim.low, dim.high):
        try:
            apply_overrides(base, {key: value})
        except ConfigError as err:
            raise ConfigError(f"space: {key}: the value {value!r} is not allowed ({err})") from err


def load_space(path: str | os.PathLike[str], base: Config | None = None) -> dict[str, Dimension]:
    """Read a search space YAML file (same format as `parse_space`)."""
    import yaml

    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping of config keys to ranges, got {type(raw).__name__}")
    return parse_space(raw, base)


def with_learning_rate(space: Mapping[str, Dimension], base: Config, key: str = "optim.lr_feature",
                       factor: float = 10.0) -> dict[str, Dimension]:
    """The space plus `key` searched on a log scale over [base / factor, base * factor] (around the default)."""
    value = to_flat_dict(base)[key]
    return dict(space) | {key: Dimension("loguniform", value / factor, value * factor)}


def default_point(space: Mapping[str, Dimension], base: Config) -> dict[str, Any] | None:
    """The base config's values of the searched keys (the paper's defaults), or None when one lies outside."""
    flat = to_flat_dict(base)
    point = {key: flat[key] for key in space}
    outside = [key for key, dim in space.items() if not dim.contains(point[key])]
    if outside:
        log.warning("the base values of %s lie outside the search space: not evaluated first", ", ".join(outside))
        return None
    return point


# --------------------------------------------------------------------------------------------- Ray and storage


def is_remote_path(path: str) -> bool:
    """True for URIs such as s3://bucket/x or gs://bucket/x (one-letter schemes are Windows drives)."""
    scheme = urlparse(path).scheme
    return len(scheme) > 1 and scheme != "file"


def absolute_storage(path: str | None) -> str:
    """A Tune storage path every trial can use: remote URIs as given, local paths absolute (default ./ray_results)."""
    if not path:
        return str(Path.cwd() / "ray_results")
    if is_remote_path(path):
        return path.rstrip("/")
    local = urlparse(path).path if path.startswith("file:") else path
    return str(Path(local).expanduser().resolve())


def _ray_env(local: bool) -> None:
    """Ray 2.60 reads these at start-up; every process of a local cluster must agree on the auth mode."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # CheckpointConfig(num_to_keep=1) (disk stays bounded) forces a state snapshot per checkpoint; Tune then warns
    # at every epoch that snapshots are frequent. That is the intended trade-off, not news.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's newer console output prints every metric of a trial in a box (dozens of lines per trial) even with
    # verbose=0; the classic output with verbose=0 leaves the console to our one-line-per-event progress callback.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if local:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: the running instance, `address` / $RAY_ADDRESS ('auto' on a `ray up` head), or a new local
    instance with `num_cpus` (default: all cores) and a small object store. True when a local instance was started."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    _ray_env(local=address is None)
    import ray

    if ray.is_initialized():
        return False
    if address:
        if num_cpus:
            log.warning("num_cpus=%s ignored: connecting to the existing cluster at %s", num_cpus, address)
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
             include_dashboard=False, logging_level=logging.WARNING)
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """`connect_ray` for a block; shuts Ray down afterwards only if the block started it."""
    started = connect_ray(address, num_cpus)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def check_cluster_storage(storage_path: str, tracking_uri: str, shared_storage: bool = False) -> None:
    """Refuse machine-local storage when trials run on other machines (more than one node, or a head without CPUs).

    Tune's experiment dir and checkpoints must be reachable from every node (S3 / GCS / NFS), and so must a SQLite
    tracking database. `shared_storage=True` asserts that local paths are on a file system every node mounts.
    """
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    driver_cpus = next((n.get("Resources", {}).get("CPU", 0) for n in nodes if n["NodeID"] == here), 0)
    if len(nodes) <= 1 and driver_cpus > 0:
        return
    sqlite = urlparse(tracking_uri).scheme in ("sqlite", "file", "")
    if shared_storage:
        if sqlite:
            log.warning("MLflow's SQLite file %s is shared by several nodes: file locking on network file systems "
                        "is fragile; the head node's MLflow server is the safer choice", tracking_uri)
        return
    problems = []
    if not is_remote_path(storage_path):
        problems.append(f"the Tune storage path {storage_path} is a local folder: use --storage-path "
                        "s3://BUCKET/PATH (or gs://...), or an NFS/EFS path mounted at the same place on every node "
                        "together with --shared-storage (storage_path / shared_storage=True)")
    if sqlite:
        problems.append(f"the MLflow store {tracking_uri} is a file on this machine: use the head node's MLflow "
                        "server, --tracking-uri http://HEAD_PRIVATE_IP:5000 (ray_cluster.yaml starts it)")
    if problems:
        why = f"{len(nodes)} nodes" + ("" if driver_cpus else ", and this node runs no trials")
        raise TuneError(f"this Ray cluster has {why}, so trials run on other machines:\n- " + "\n- ".join(problems))


def prepare_configs(configs: Sequence[Config]) -> list[Config]:
    """Copies ready for trials: absolute data paths (trials run in other directories), no progress bars, and each
    distinct benchmark built here once, before any trial starts (trials find it by its content hash)."""
    from comic.data.benchmark import ensure_benchmark

    built: set[str] = set()
    out = []
    for cfg in configs:
        ready = apply_overrides(cfg, {"engine.progress": False})
        ready.data.cache_dir = str(Path(ready.data.cache_dir).expanduser().resolve())
        if ready.data.root:
            ready.data.root = str(Path(ready.data.root).expanduser().resolve())
        key = json.dumps(to_dict(ready)["data"], sort_keys=True)
        if key not in built:
            ensure_benchmark(ready.data)
            built.add(key)
        out.append(ready)
    return out


# --------------------------------------------------------------------------------------------- running a Tuner


def _experiment_path(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def _run_config(name: str, storage_path: str, max_failures: int, callbacks: Sequence[Any]) -> Any:
    from ray import tune

    return tune.RunConfig(name=name, storage_path=storage_path, verbose=0, callbacks=list(callbacks),
                          failure_config=tune.FailureConfig(max_failures=max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1))


def _trainable(job: Any, resources: Resources) -> Any:
    from ray import tune

    from comic.tune_runtime import comic_trial

    return tune.with_resources(tune.with_parameters(comic_trial, job=job), resources.as_ray())


def _fit(path: str, trainable: Any, make_tuner: Any, *, expected: int, resume: bool, resume_errored: bool) -> Any:
    """Fit a new Tuner, or restore the one at `path` (finished trials are kept, never re-run); `make_tuner()` builds
    a new one. A new run refuses an existing experiment: Tune would mix two runs in one directory. Fewer than
    `expected` ended trials afterwards means Tune was interrupted (it returns normally then)."""
    from ray import tune

    exists = tune.Tuner.can_restore(path)
    if exists and not resume:
        raise TuneError(f"a Tune experiment already exists at {path}: resume it (--resume / resume=True) or choose "
                        "another name (--name)")
    if exists:
        log.info("resuming the Tune experiment at %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=resume_errored)
    else:
        tuner = make_tuner()
    grid = tuner.fit()
    if grid.num_terminated + grid.num_errors < expected:
        raise TuneInterrupted(path)
    return grid


def run_configs(configs: list[Config], *, names: list[str], storage_path: str, name: str, tracking_uri: str,
                experiment: str, parent_run_id: str | None, resources: Resources, max_failures: int = 1,
                resume: bool = False, tags: list[dict[str, str]] | None = None,
                shared_storage: bool = False) -> list[dict[str, float]]:
    """Run every config once as a Tune trial (a grid, no search, no early stopping), each a child MLflow run.

    Trial i is MLflow run `names[i]` under `parent_run_id` with extra `tags[i]`. A crashed trial restarts from its
    last epoch checkpoint up to `max_failures` times. `resume=True` continues the Tune experiment
    `storage_path/name` if there is one (finished trials are kept; errored ones resume from their last
    checkpoint) and starts it otherwise; `resume=False` refuses an existing one. Returns each config's final
    metrics (`FitResult.metrics`, with best/...) in input order; `{}` for a trial that errored for good (logged at
    ERROR level; its run is FAILED). Raises TuneInterrupted when the run was interrupted (resume to continue).
    """
    from ray import tune

    from comic.tracking import ensure_experiment, resolve_tracking_uri
    from comic.tune_runtime import RunStates, TrialJob

    if len(names) != len(configs) or (tags is not None and len(tags) != len(configs)):
        raise ValueError(f"{len(configs)} configs need as many names ({len(names)}) and tags "
                         f"({'none' if tags is None else len(tags)})")
    connect_ray()
    uri, storage = resolve_tracking_uri(tracking_uri), absolute_storage(storage_path)
    check_cluster_storage(storage, uri, shared_storage)
    ensure_experiment(uri, experiment)
    job = TrialJob(uri, experiment, parent_run_id, "grid", cells=tuple(to_dict(c) for c in prepare_configs(configs)),
                   names=tuple(names), tags=tuple(dict(t) for t in tags or ()))
    trainable = _trainable(job, resources)
    callbacks = [RunStates(uri, experiment, parent_run_id), _progress(())]

    def make_tuner() -> Any:
        return tune.Tuner(trainable, param_space={"cell": tune.grid_search(list(range(len(configs))))},
                          tune_config=tune.TuneConfig(max_concurrent_trials=resources.max_concurrent or None,
                                                      trial_name_creator=_CellName(tuple(names))),
                          run_config=_run_config(name, storage, max_failures, callbacks))

    grid = _fit(_experiment_path(storage, name), trainable, make_tuner, expected=len(configs), resume=resume,
                resume_errored=True)
    if len(grid) != len(configs):
        raise TuneError(f"the Tune experiment {_experiment_path(storage, name)} holds {len(grid)} trials, not "
                        f"{len(configs)}: resume it with the configs it was started with, or choose another name")
    return _metrics_by_cell(grid, names)


@dataclass(frozen=True)
class _CellName:
    """Tune trial name = the caller's name of the cell (a class, not a lambda: Tune pickles it with the run)."""

    names: tuple[str, ...]

    def __call__(self, trial: Any) -> str:
        return self.names[int(trial.config["cell"])]


def _progress(params: Sequence[str]) -> Any:
    from comic.tune_runtime import Progress

    return Progress(METRIC, tuple(params))


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


# --------------------------------------------------------------------------------------------- the sweep


@dataclass
class SweepSpec:
    """A TPE + ASHA sweep: the base config, the space, the budget and where it runs and logs."""

    base: Config
    space: dict[str, Dimension] = field(default_factory=lambda: parse_space(DEFAULT_SPACE))
    num_samples: int = 12
    seed: int = 0
    grace_period: int = 2
    reduction_factor: int = 2
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 1
    storage_path: str = ""
    name: str = ""
    tracking_uri: str | None = None
    experiment: str = "comic-sweep"
    shared_storage: bool = False
    confirm_top: int = 0
    confirm_seeds: int = 3

    def check(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: must be >= 1")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("grace_period must be >= 1 and reduction_factor >= 2")
        if self.confirm_top < 0 or self.confirm_seeds < 1:
            raise ValueError("confirm_top must be >= 0 and confirm_seeds >= 1")


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


def _resolve(spec: SweepSpec) -> SweepSpec:
    from comic.tracking import resolve_tracking_uri

    spec.check()
    name = spec.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    return replace(spec, name=name, storage_path=absolute_storage(spec.storage_path),
                   tracking_uri=resolve_tracking_uri(spec.tracking_uri))


def _state_fs(path: str) -> tuple[Any, str]:
    from pyarrow import fs

    return fs.FileSystem.from_uri(path)


def _save_state(spec: SweepSpec, parent_run_id: str) -> None:
    """The sweep's settings and parent run next to Tune's state (on S3 too): `resume` needs only the path."""
    state = {"parent_run_id": parent_run_id, "tracking_uri": spec.tracking_uri, "experiment": spec.experiment,
             "base": to_dict(spec.base), "space": {k: d.describe() for k, d in spec.space.items()},
             "num_samples": spec.num_samples, "seed": spec.seed, "grace_period": spec.grace_period,
             "reduction_factor": spec.reduction_factor, "max_failures": spec.max_failures,
             "resources": vars(spec.resources), "shared_storage": spec.shared_storage}
    filesystem, path = _state_fs(_experiment_path(spec.storage_path, spec.name))
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(f"{path}/{STATE_FILE}") as out:
        out.write(json.dumps(state, indent=2, default=str).encode())


def load_sweep(storage_path: str | None, name: str | None = None) -> tuple[SweepSpec, str]:
    """The saved spec and parent run id of sweep `name` (default: the latest one in a local storage path)."""
    storage = absolute_storage(storage_path)
    name = name or _latest_sweep(storage)
    filesystem, path = _state_fs(f"{_experiment_path(storage, name)}/{STATE_FILE}")
    try:
        with filesystem.open_input_stream(path) as fh:
            state = json.loads(fh.read().decode())
    except FileNotFoundError as err:
        raise TuneError(f"no sweep to resume at {_experiment_path(storage, name)} (no {STATE_FILE}); check "
                        "--storage-path and --name") from err
    spec = SweepSpec(base=from_dict(state["base"]), space=parse_space(state["space"]),
                     num_samples=state["num_samples"], seed=state["seed"], grace_period=state["grace_period"],
                     reduction_factor=state["reduction_factor"], resources=Resources(**state["resources"]),
                     max_failures=state["max_failures"], storage_path=storage, name=name,
                     tracking_uri=state["tracking_uri"], experiment=state["experiment"],
                     shared_storage=state["shared_storage"])
    return spec, state["parent_run_id"]


def _latest_sweep(storage: str) -> str:
    if is_remote_path(storage):
        raise TuneError(f"give the sweep's --name to resume it from {storage}")
    found = sorted(Path(storage).glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise TuneError(f"no sweep to resume in {storage}; check --storage-path")
    return found[-1].parent.name


def run_sweep(spec: SweepSpec, *, resume: bool = False, callbacks: Sequence[Any] = ()) -> SweepResult:
    """Run (or with `resume`, continue) an Optuna TPE + ASHA sweep under one MLflow parent run; then, if
    `spec.confirm_top`, rerun the best configs over `spec.confirm_seeds` seeds without early stopping.

    Connects to Ray first if needed (see `connect_ray`). Raises TuneInterrupted when stopped before the end
    (the parent run ends KILLED; `resume=True` with the same storage path and name continues it).
    """
    from comic.tracking import RunTracker, ensure_experiment, run_tags

    spec = _resolve(spec)
    connect_ray()
    check_cluster_storage(spec.storage_path, spec.tracking_uri, spec.shared_storage)
    parent_id = _parent_for(spec, resume)
    spec = replace(spec, base=prepare_configs([spec.base])[0])
    ensure_experiment(spec.tracking_uri, spec.experiment)
    tags = run_tags({"sweep.name": spec.name, "sweep.path": _experiment_path(spec.storage_path, spec.name),
                     "sweep.kind": "optuna-tpe+asha"})
    with RunTracker(spec.tracking_uri, spec.experiment, run_name=spec.name, run_id=parent_id, tags=tags) as parent:
        if parent_id is None:
            _save_state(spec, parent.run_id)
        _log_inputs(parent, spec)
        grid = _search(spec, parent.run_id, resume, callbacks)
        rows = trial_rows(grid, spec.space)
        best = best_row(rows)
        best_config = apply_overrides(spec.base, {k: best[k] for k in spec.space}) if best else None
        _log_results(parent, spec, rows, best, best_config)
        best_path = _save_best(spec, best_config) if best_config else None
        confirm = _confirm(spec, rows, parent) if spec.confirm_top else []
    return SweepResult(spec.name, _experiment_path(spec.storage_path, spec.name), spec.tracking_uri, spec.experiment,
                       parent.run_id, rows, best, best_config, best_path, confirm)


def _save_best(spec: SweepSpec, best_config: Config) -> str:
    """The best configuration, in full, beside the sweep's Tune state: `train.py --config` takes it as is."""
    import yaml

    path = f"{_experiment_path(spec.storage_path, spec.name)}/best_config.yaml"
    filesystem, fs_path = _state_fs(path)
    with filesystem.open_output_stream(fs_path) as out:
        out.write(yaml.safe_dump(to_dict(best_config), sort_keys=False).encode())
    return path


def _parent_for(spec: SweepSpec, resume: bool) -> str | None:
    """The parent run id to reattach on resume; a new sweep must not reuse an existing experiment directory."""
    from ray import tune

    path = _experiment_path(spec.storage_path, spec.name)
    filesystem, state = _state_fs(f"{path}/{STATE_FILE}")
    saved = filesystem.get_file_info(state).type.name != "NotFound"
    if resume:
        if not saved:
            raise TuneError(f"nothing to resume at {path}; run without --resume to start this sweep")
        return load_sweep(spec.storage_path, spec.name)[1]
    if saved or tune.Tuner.can_restore(path):
        raise TuneError(f"sweep {spec.name!r} already exists at {path}: add --resume to continue it, or pick "
                        "another --name")
    return None


def _search(spec: SweepSpec, parent_run_id: str, resume: bool, callbacks: Sequence[Any]) -> Any:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from comic.tune_runtime import EpochASHA, RunStates, SweepTrialName, TrialJob

    job = TrialJob(spec.tracking_uri, spec.experiment, parent_run_id, "search", base=to_dict(spec.base))
    trainable = _trainable(job, spec.resources)
    point = default_point(spec.space, spec.base)
    epochs = spec.base.train.epochs
    all_callbacks = [RunStates(spec.tracking_uri, spec.experiment, parent_run_id), _progress(tuple(spec.space)),
                     *callbacks]

    def make_tuner() -> Any:
        searcher = OptunaSearch(points_to_evaluate=[point] if point else None, seed=spec.seed)
        scheduler = EpochASHA(time_attr="epoch", max_t=epochs, grace_period=min(spec.grace_period, epochs),
                              reduction_factor=spec.reduction_factor)
        config = tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                 num_samples=spec.num_samples, trial_name_creator=SweepTrialName(),
                                 max_concurrent_trials=spec.resources.max_concurrent or None)
        return tune.Tuner(trainable, param_space={k: d.to_tune() for k, d in spec.space.items()}, tune_config=config,
                          run_config=_run_config(spec.name, spec.storage_path, spec.max_failures, all_callbacks))

    # An errored search trial is a result of its hyperparameters (e.g. divergence): resume does not retry it.
    return _fit(_experiment_path(spec.storage_path, spec.name), trainable, make_tuner, expected=spec.num_samples,
                resume=resume, resume_errored=False)


# --------------------------------------------------------------------------------------------- results


def trial_rows(grid: Any, space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per trial in creation order: trial, state, epochs run, the searched params, val/map (best epoch),
    test/map at that epoch, best epoch, MLflow run id."""
    from comic.tune_runtime import FINAL_KEY, RUN_ID_KEY

    rows = []
    for result in grid:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        row: dict[str, Any] = {"trial": _trial_name(result), "state": "completed"}
        if result.error is not None:
            row["state"] = "errored"
        elif not metrics.get(FINAL_KEY):
            row["state"] = "early-stopped"
        row |= {key: result.config.get(key) for key in space}
        row |= _best_epoch(history)
        row["mlflow_run_id"] = metrics.get(RUN_ID_KEY, "")
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def _trial_name(result: Any) -> str:
    """From the last result's experiment tag, or from the trial's directory name (it starts with the trial name)
    for a trial that errored before reporting."""
    from comic.tune_runtime import trial_label

    tag = (result.metrics or {}).get("experiment_tag")
    return trial_label(str(tag)) if tag else Path(str(result.path)).name.split("_", 1)[0]


def _best_epoch(history: Any) -> dict[str, Any]:
    """The epoch with the highest val/map (the first on a tie; NaN never wins), as fit picks its best epoch."""
    empty = {"epochs": 0, METRIC: math.nan, "test/map": math.nan, "best_epoch": 0}
    if history is None or METRIC not in history or history.empty:
        return empty
    epochs = int(history["epoch"].max()) if "epoch" in history else 0
    scores = history[METRIC].astype(float)
    if scores.isna().all():
        return empty | {"epochs": epochs}
    at = scores.idxmax()
    test = float(history["test/map"][at]) if "test/map" in history else math.nan
    return {"epochs": epochs, METRIC: float(scores[at]), "test/map": test, "best_epoch": int(history["epoch"][at])}


def best_row(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The row with the highest val/map (the earliest trial on a tie), or None when no trial has a score."""
    scored = [r for r in rows if isinstance(r.get(METRIC), float) and math.isfinite(r[METRIC])]
    return dict(max(scored, key=lambda r: (r[METRIC], -rows.index(r)))) if scored else None


def _log_inputs(parent: Any, spec: SweepSpec) -> None:
    parent.log_params({"sweep.metric": f"{METRIC} ({MODE})", "sweep.num_samples": spec.num_samples,
                       "sweep.seed": spec.seed, "sweep.max_t": spec.base.train.epochs,
                       "sweep.grace_period": spec.grace_period, "sweep.reduction_factor": spec.reduction_factor,
                       "sweep.cpus_per_trial": spec.resources.cpus_per_trial,
                       "sweep.gpus_per_trial": spec.resources.gpus_per_trial,
                       "sweep.max_concurrent": spec.resources.max_concurrent, "sweep.max_failures": spec.max_failures})
    parent.log_dict({k: d.describe() for k, d in spec.space.items()}, "search_space.yaml")
    parent.log_dict(to_dict(spec.base), "base_config.yaml")


def _log_results(parent: Any, spec: SweepSpec, rows: list[dict[str, Any]], best: dict[str, Any] | None,
                 best_config: Config | None) -> None:
    from comic import plots

    parent.log_table(rows, "trials")
    parent.log_text(markdown_table(rows, _columns(spec.space)), "tables/trials.md")
    counts = {state: sum(r["state"] == state for r in rows) for state in ("completed", "early-stopped", "errored")}
    parent.log_metrics({f"trials/{k.replace('-', '_')}": v for k, v in counts.items()}, step=0)
    values = [r[METRIC] for r in rows]
    parent.log_figure(plots.plot_optimization_history(values, [r["state"] for r in rows], METRIC),
                      "plots/optimization_history.png")
    logs = tuple(k for k, d in spec.space.items() if d.kind == "loguniform")
    parent.log_figure(plots.plot_parallel_coordinates(rows, list(spec.space), METRIC, log_params=logs),
                      "plots/parallel_coordinates.png")
    if best is None or best_config is None:
        parent.set_tags({"sweep.best": "none: no trial reported val/map"})
        return
    parent.log_dict({k: best[k] for k in spec.space}, "best_overrides.yaml")
    parent.log_dict(to_dict(best_config), "best_config.yaml")
    parent.log_metrics({f"best/{METRIC}": best[METRIC], "best/test/map": best["test/map"]}, step=0)
    parent.set_tags({"sweep.best_trial": best["trial"], "sweep.best_run_id": best["mlflow_run_id"]})


def _columns(space: Mapping[str, Any]) -> list[str]:
    return ["trial", "state", "epochs", *space, METRIC, "test/map", "best_epoch"]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of `columns` (floats to 4 significant digits, NaN as '-')."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_trials(rows: Sequence[Mapping[str, Any]], space: Mapping[str, Any], limit: int = 20) -> str:
    """A fixed-width console table of the best `limit` trials by val/map."""
    columns = _columns(space)
    ranked = sorted(rows, key=lambda r: -r[METRIC] if math.isfinite(r[METRIC]) else math.inf)[:limit]
    cells = [[_cell(r.get(c, "")) for c in columns] for r in ranked]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more trials in the MLflow parent run's tables/trials.csv")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- confirmation


def _confirm(spec: SweepSpec, rows: list[dict[str, Any]], parent: Any) -> list[dict[str, Any]]:
    """Rerun the top `confirm_top` configs over `confirm_seeds` seeds (no early stopping) and summarize them."""
    ranked = sorted((r for r in rows if math.isfinite(r[METRIC])), key=lambda r: -r[METRIC])[:spec.confirm_top]
    configs, names, tags, ranks = [], [], [], []
    for rank, row in enumerate(ranked, 1):
        for offset in range(spec.confirm_seeds):
            seed = spec.base.seed + offset
            configs.append(apply_overrides(spec.base, {k: row[k] for k in spec.space} | {"seed": seed}))
            names.append(f"top{rank}-seed{seed}")
            tags.append({"confirm.rank": str(rank), "confirm.source_trial": row["trial"], "sweep.phase": "confirm"})
            ranks.append(rank)
    parent.set_tags({"confirm.top": str(spec.confirm_top), "confirm.seeds": str(spec.confirm_seeds)})
    # The settings are in the name: a resume with other ones starts a new confirmation instead of mixing them.
    name = f"{spec.name}-confirm-top{spec.confirm_top}x{spec.confirm_seeds}"
    metrics = run_configs(configs, names=names, storage_path=spec.storage_path, name=name,
                          tracking_uri=spec.tracking_uri, experiment=spec.experiment, parent_run_id=parent.run_id,
                          resources=spec.resources, max_failures=spec.max_failures, resume=True, tags=tags,
                          shared_storage=spec.shared_storage)
    summary = summarize_confirm(ranked, ranks, metrics, spec.space)
    _log_confirm(parent, summary, spec.space)
    return summary


def summarize_confirm(ranked: Sequence[Mapping[str, Any]], ranks: Sequence[int], metrics: Sequence[Mapping[str, float]],
                      space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per confirmed config: its params, the number of seeds that finished, and mean / std of CONFIRM_METRICS
    (sample std, ddof=1; NaN with a single seed)."""
    import numpy as np

    out = []
    for rank, row in enumerate(ranked, 1):
        runs = [m for r, m in zip(ranks, metrics, strict=True) if r == rank and m]
        entry: dict[str, Any] = {"rank": rank, "source_trial": row["trial"], **{k: row[k] for k in space},
                                 "n": len(runs)}
        for key in CONFIRM_METRICS:
            values = np.array([m[key] for m in runs if key in m], dtype=float)
            entry[f"{key}/mean"] = float(values.mean()) if values.size else math.nan
            entry[f"{key}/std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
        out.append(entry)
    return out


def _mean_std(entry: Mapping[str, Any], key: str) -> str:
    mean, std = entry[f"{key}/mean"], entry[f"{key}/std"]
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def format_confirm(summary: Sequence[Mapping[str, Any]], space: Mapping[str, Any]) -> str:
    """A Markdown table: rank, params, seeds, mean ± std of the confirmation metrics."""
    columns = ["rank", *space, "n", *CONFIRM_METRICS]
    rows = [{**{c: e[c] for c in ("rank", *space, "n")}, **{k: _mean_std(e, k) for k in CONFIRM_METRICS}}
            for e in summary]
    return markdown_table(rows, columns)


def _log_confirm(parent: Any, summary: list[dict[str, Any]], space: Mapping[str, Any]) -> None:
    parent.log_table(summary, "confirm")
    parent.log_text(format_confirm(summary, space), "tables/confirm.md")
    metrics = {f"confirm/top{e['rank']}/{k.replace('best/', '').replace('/', '_')}_{stat}": e[f"{k}/{stat}"]
               for e in summary for k in CONFIRM_METRICS for stat in ("mean", "std")}
    parent.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=0)
