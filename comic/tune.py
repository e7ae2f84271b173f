"""Ray Tune orchestration: search spaces, the Ray connection and storage checks, and plain grids of configs
(`run_configs`); the Optuna + ASHA sweep built on it is `comic.sweep`. Every trial is a tracked run.

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
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from comic.config import Config, ConfigError, apply_overrides, field_specs, read_yaml_mapping, to_dict, to_flat_dict

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
    return parse_space(read_yaml_mapping(path, "config keys to ranges"), base)


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


def experiment_path(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def make_run_config(name: str, storage_path: str, max_failures: int, callbacks: Sequence[Any]) -> Any:
    from ray import tune

    return tune.RunConfig(name=name, storage_path=storage_path, verbose=0, callbacks=list(callbacks),
                          failure_config=tune.FailureConfig(max_failures=max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1))


def trial_trainable(job: Any, resources: Resources) -> Any:
    from ray import tune

    from comic.tune_runtime import comic_trial

    return tune.with_resources(tune.with_parameters(comic_trial, job=job), resources.as_ray())


def fit_tuner(path: str, trainable: Any, make_tuner: Any, *, expected: int, resume: bool, resume_errored: bool) -> Any:
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
    trainable = trial_trainable(job, resources)
    callbacks = [RunStates(uri, experiment, parent_run_id), progress_callback(())]

    def make_tuner() -> Any:
        return tune.Tuner(trainable, param_space={"cell": tune.grid_search(list(range(len(configs))))},
                          tune_config=tune.TuneConfig(max_concurrent_trials=resources.max_concurrent or None,
                                                      trial_name_creator=_CellName(tuple(names))),
                          run_config=make_run_config(name, storage, max_failures, callbacks))

    grid = fit_tuner(experiment_path(storage, name), trainable, make_tuner, expected=len(configs), resume=resume,
                resume_errored=True)
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


def progress_callback(params: Sequence[str]) -> Any:
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
