"""Shared fixtures: reference data location, process-wide environment for Ray/MLflow tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Ray 2.60 token auth must be set identically for every process of a test cluster (env.md §4.4).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout (reference data); skipped with a reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent (CI has it; users never need it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smoke_overrides(tmp_path_factory) -> dict:
    """The scripts' smoke configuration with one shared data cache for the whole session (built once)."""
    from comic.presets import SMOKE_OVERRIDES

    cache = tmp_path_factory.mktemp("comic_data")
    return SMOKE_OVERRIDES | {"data.cache_dir": str(cache), "engine.progress": False}


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """A script's `main()` run in this process leaves its after-the-end handlers (`comic.progress.finished`) for the
    process's exit, as a real script's process needs them, and a bare `Tuner.fit()` leaves Tune's: the next test
    starts with the handlers it had."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def _ray_session_end():
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def ray_local(_ray_session_end):
    """The session's one local Ray instance (2 CPUs, 200 MB object store, no dashboard), started on first use.

    Shared by every test that needs local Ray; a test that needs its own cluster (the two-node test) shuts it down
    and the next user starts it again. Shut down at the end of the session.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
                 logging_level="WARNING")
    return ray


class CrashAfter:
    """A `fit` report that raises once, right after epoch `epoch` was checkpointed (and, in a tracked run, logged):
    a crash at the worst moment, injected from outside the library."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.fired = epoch, False

    def __call__(self, metrics: dict, run) -> None:
        if metrics["epoch"] == self.epoch and not self.fired:
            self.fired = True
            raise RuntimeError(f"crash after epoch {self.epoch}")


def _evaluate_best(cfg, workdir) -> dict[str, float]:
    """Test metrics of the weights in `workdir`'s best.pt, on a model built afresh from `cfg` (its frozen parameters
    as the config re-creates them)."""
    from comic.checkpoint import frozen_names, load_best, load_trainable_state
    from comic.engine import evaluate, setup

    best = load_best(workdir)
    s = setup(cfg)
    model, frozen = s.objects["model"], frozenset(best["frozen"])
    assert frozen_names(model, s.objects["optimizer"]) == frozen
    load_trainable_state(model, best["model"], frozen, "best.pt")
    return evaluate(model, s.loaders["test"], s.rt, s.bench.train_counts, "test")[0]


@pytest.fixture
def evaluate_best():
    """`evaluate_best(cfg, workdir)`: a run's best-on-val weights, evaluated on its test set from a fresh model."""
    return _evaluate_best


@pytest.fixture
def crash_after():
    """Factory of `CrashAfter` reports."""
    return CrashAfter


def load_script(path: Path):
    """A script (experiments/*.py, ablations/*.py) as a module, to call its `main(argv)` in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def script():
    """Loads `REPO/<relative path>` as a module: `script("experiments/train.py").main([...])`."""
    return lambda relative: load_script(REPO / relative)


@pytest.fixture
def restore_torch_globals():
    """engine.threads / engine.deterministic change process-wide torch settings; put them back."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


@pytest.fixture
def offline_imagenet(shared_data, tmp_path_factory, monkeypatch):
    """torchvision's real ImageNet MobileNetV2 file in a temporary `TORCH_HOME` hub cache, with the network cut at
    torch.hub's download: `model.weights=imagenet` must load it from the cache."""
    import shutil
    import urllib.error

    import torch

    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(shared_data / "weights" / MOBILENET_FILE, home / "hub" / "checkpoints" / MOBILENET_FILE)
    monkeypatch.setenv("TORCH_HOME", str(home))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return home / "hub" / "checkpoints" / MOBILENET_FILE


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (free port, SQLite store, served artifacts), stopped with SIGTERM."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in teardown
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--artifacts-destination", str(tmp_path / "served")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not come up:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
