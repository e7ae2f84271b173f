"""Where a sweep runs: per-trial resources, the Ray connection (a new local instance or a cluster) and the checks
that storage and tracking are reachable from every node that runs trials.

The Tune experiment directory (`storage_path/name`) is the source of truth, MLflow the view. On a multi-node cluster
a local storage path or a SQLite tracking URI is refused unless `shared_storage` asserts every node sees that path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import ray

from comic._io import UserError
from comic.progress import sigterm_as_interrupt

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # trials exchange small dicts only; Ray's default would take 30% of RAM


class TuneError(UserError, RuntimeError):
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
            raise TuneError(f"cpus_per_trial={self.cpus_per_trial}: must be > 0 (--cpus-per-trial)")
        if self.gpus_per_trial < 0 or (self.gpus_per_trial > 1 and not float(self.gpus_per_trial).is_integer()):
            raise TuneError(f"gpus_per_trial={self.gpus_per_trial}: use a fraction in (0, 1] or a whole number "
                            "(--gpus-per-trial)")
        if self.max_concurrent < 0:
            raise TuneError(f"max_concurrent={self.max_concurrent}: must be >= 0, 0 = no limit (--max-concurrent)")

    def as_ray(self) -> dict[str, float]:
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}


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


def _ray_env() -> None:
    """Settings Ray 2.60 reads at start-up."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # CheckpointConfig(num_to_keep=1) (disk stays bounded) forces a state snapshot per checkpoint; Tune then warns
    # at every epoch that snapshots are frequent. That is the intended trade-off, not news.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's newer console output prints every metric of a trial in a box (dozens of lines per trial) even with
    # verbose=0; the classic output with verbose=0 leaves the console to our one-line-per-event progress callback.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # With RAY_AUTH_MODE unset, a new local instance uses Ray's own token auth (a token generated once in
    # ~/.ray/auth_token, the mode passed on to every process Ray starts), so nobody else on the network can submit
    # work to it; setting the mode here instead would come too late for this process's cached Ray config.


_STARTED_HERE = [False]  # whether this process started the (local) Ray instance it is connected to


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: the running instance, `address` / $RAY_ADDRESS ('auto' on a `ray up` head), or a new local
    instance with `num_cpus` (default: all cores) and a small object store. True when a local instance was started."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    _ray_env()
    if ray.is_initialized():
        return False
    if address:
        if num_cpus:
            log.warning("num_cpus=%s ignored: connecting to the existing cluster at %s", num_cpus, address)
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
             include_dashboard=False, logging_level=logging.WARNING)
    _STARTED_HERE[0] = True
    return True


def check_resources(resources: Resources) -> None:
    """Fail fast when no node can run one trial: a local instance this process started has every node it will ever
    have (Ray would wait forever, repeating that no node type fits). On a cluster joined by address, an autoscaler may
    still add such a node, so it is a warning there."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus, gpus = resources.cpus_per_trial, resources.gpus_per_trial
    if any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        return
    have = "; ".join(f"{n.get('CPU', 0):g} CPUs, {n.get('GPU', 0):g} GPUs" for n in nodes) or "none alive"
    message = (f"no node of this Ray cluster can run a trial with {cpus:g} CPUs and {gpus:g} GPUs (nodes: {have}); "
               "lower --cpus-per-trial / --gpus-per-trial")
    if _STARTED_HERE[0]:
        raise TuneError(message)
    log.warning("%s, unless the cluster's autoscaler adds a node that has them", message)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """`connect_ray` for a block; shuts Ray down afterwards only if the block started it."""
    started = connect_ray(address, num_cpus)
    try:
        with sigterm_as_interrupt():  # a local Ray's start replaced the script's SIGTERM policy with its own (exit 1)
            yield
    finally:
        if started:
            ray.shutdown()
            _STARTED_HERE[0] = False


def check_cluster_storage(storage_path: str, tracking_uri: str, shared_storage: bool = False) -> None:
    """Refuse machine-local storage when trials run on other machines (more than one node, or a head without CPUs).

    Tune's experiment dir and checkpoints must be reachable from every node (S3 / GCS / NFS), and so must a SQLite
    tracking database. `shared_storage=True` asserts that local paths are on a file system every node mounts.
    """
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


def experiment_path(storage_path: str, name: str) -> str:
    """The Tune experiment directory `name` under `storage_path` (a local path or a URI)."""
    return f"{storage_path.rstrip('/')}/{name}"
