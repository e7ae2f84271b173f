"""What one cached COMIC trial costs against its compute floor, measured side by side in one run.

Runs `experiments/train.py --preset voc2007-dev-lt` end to end as a user would (a fresh process; the benchmark, its
MobileNetV2 features and the MLflow store already made) on the real VOC2007 photos of ../shared/data, one torch
thread, 40 epochs, and prints, all measured in this run:
  - the run's wall time, and its training-step time (the run's own `perf/epoch_s`, summed over its epochs);
  - the training step's FLOPs (`FlopCounterMode`: forward and backward of the run's model and loss on one batch);
  - the machine's single-thread GEMM rate (a 1024^3 GEMM; and the step's own [B x width] x [width x 1024] shape);
  - the compute floor: steps x step FLOPs / the 1024^3 rate, and wall / floor, steps / floor;
  - the bytes the run wrote to disk (its block output, as `/usr/bin/time -v` reports "File system outputs").
The run exports no model (`--no-log-model`, as a sweep's search trial; `--log-model` measures train.py's default).
The last line reads
    wall_over_floor=<x> steps_over_floor=<y> written_mb=<z> wall_s=<w>
`--baseline DIR` runs another checkout of the project (e.g. `git worktree add /tmp/base <commit>`) the same way in the
same invocation, first, and prints its line too.

  python benchmarks/trial_cost.py                        # ../shared/data: voc2007-dev-lt, 40 epochs, one thread
  python benchmarks/trial_cost.py --baseline /tmp/base   # and the checkout at /tmp/base, side by side
  python benchmarks/trial_cost.py --smoke-test           # the synthetic smoke benchmark: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from mlflow import MlflowClient
from torch.utils.flop_counter import FlopCounterMode

from comic.config import Config, load_config
from comic.data.build import ensure_benchmark
from comic.data.features import prepare_features
from comic.data.reader import load_benchmark
from comic.methods import DataStats, build_method
from comic.presets import SMOKE_OVERRIDES
from comic.tracking.store import ensure_experiment

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1 file: model.weights=imagenet finds it offline
EXPERIMENT = "trial-cost"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"),
                        help="the shared data folder (voc2007-dev/VOCdevkit and weights/ inside)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the run (a Ray trial with 1 CPU: 1)")
    parser.add_argument("--cache-dir", default=str(REPO / "comic_data"),
                        help="built benchmarks and features (default: the project's own, so built features are reused)")
    parser.add_argument("--baseline", help="another checkout of the project to run the same way, first")
    parser.add_argument("--log-model", action="store_true",
                        help="let the run export and log its best model, as train.py does by default (off: a sweep's "
                             "search trial, which logs none)")
    parser.add_argument("--smoke-test", action="store_true", help="the synthetic smoke benchmark, 2 epochs: seconds")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace, cache_dir: str) -> tuple[str, list[str]]:
    """(preset, key=value overrides) of the measured run."""
    if args.smoke_test:
        keys = SMOKE_OVERRIDES | {"model.profile": "frozen", "engine.progress": False}
        return "synthetic", [f"{k}={v}" for k, v in keys.items()] + [f"data.cache_dir={cache_dir}"]
    return "voc2007-dev-lt", [f"data.root={Path(args.data) / 'voc2007-dev' / 'VOCdevkit'}",
                              f"data.cache_dir={cache_dir}", f"train.epochs={args.epochs}",
                              f"engine.threads={args.threads}", "engine.progress=false"]


def prepare(preset: str, keys: list[str]) -> tuple[Config, int, int, int]:
    """Benchmark and features built (not timed); returns the config, the step's FLOPs, the steps of the run and the
    width of the cached features."""
    cfg = load_config(preset, keys + ["engine.threads=0"])
    bench = load_benchmark(ensure_benchmark(cfg.data))
    features = prepare_features(cfg)
    stats = DataStats(list(bench.class_names), bench.train_counts, bench.train.observed, input_width=features.width)
    steps = cfg.train.epochs * (len(features.rows("train")) // cfg.train.batch_size)
    return cfg, step_flops(cfg, stats), steps, features.width


def step_flops(cfg: Config, stats: DataStats) -> int:
    """FLOPs of one training step of the run's model and loss (forward and backward) on a batch of cached features."""
    method = build_method(cfg, stats)
    model, criterion = method.model.train(), method.criterion
    criterion.start_epoch(1)
    inputs = torch.randn(cfg.train.batch_size, stats.input_width)
    observed = torch.as_tensor(stats.train_observed[: cfg.train.batch_size], dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        total, _ = criterion(model(inputs), observed)
        total.backward()
    return counter.get_total_flops()


def gemm_rate(m: int, k: int, n: int, threads: int, seconds: float = 1.0) -> float:
    """FLOP/s of an [m x k] x [k x n] float32 GEMM on `threads` threads (best of repeated timings)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k), torch.randn(k, n)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - tick) / 10)
    torch.set_num_threads(previous)
    return 2 * m * k * n / best


def run_trial(code: Path, preset: str, keys: list[str], work: Path, env: dict[str, str],
              log_model: bool = False) -> dict[str, float]:
    """One `experiments/train.py` run of checkout `code` in a fresh process: wall s, written bytes, step s, mAP.
    Without `log_model` the run exports no model (where the checkout's train.py can): a sweep's search trial."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    workdir = work / f"run-{code.name}-{time.monotonic_ns()}"
    script = code / "experiments" / "train.py"
    no_model = [] if log_model or "--no-log-model" not in script.read_text() else ["--no-log-model"]
    command = [sys.executable, str(script), "--preset", preset, "--workdir", str(workdir), "--tracking-uri", uri,
               "--experiment", EXPERIMENT, "--metrics-out", str(workdir) + ".json", *no_model, *keys]
    blocks = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
    start = time.perf_counter()
    done = subprocess.run(command, env=env | {"PYTHONPATH": str(code)}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    written = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - blocks) * 512
    run_id = re.search(r"MLflow run (\w+) in", done.stdout).group(1)
    epochs = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "perf/epoch_s")
    metrics = json.loads(Path(str(workdir) + ".json").read_text())
    return {"wall_s": wall, "written": written, "steps_s": sum(m.value for m in epochs),
            "test_map": metrics.get("best/test/map", float("nan"))}


def report(name: str, run: dict[str, float], floor_s: float) -> None:
    print(f"{name}: wall {run['wall_s']:.1f} s ({run['wall_s'] / floor_s:.2f}x floor), training steps "
          f"{run['steps_s']:.1f} s ({run['steps_s'] / floor_s:.2f}x floor), written {run['written'] / 1e6:.0f} MB, "
          f"best-on-val test mAP {run['test_map']:.2f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="trial-cost-"))
    cache_dir = str(work / "comic_data") if args.smoke_test else str(Path(args.cache_dir).resolve())
    env = dict(os.environ)
    if not args.smoke_test:  # model.weights=imagenet reads torchvision's file from the hub cache: no network
        hub = work / "torch_home" / "hub" / "checkpoints"
        hub.mkdir(parents=True)
        shutil.copy(Path(args.data) / "weights" / WEIGHTS, hub / WEIGHTS)
        env["TORCH_HOME"] = os.environ["TORCH_HOME"] = str(work / "torch_home")
    try:
        preset, keys = overrides(args, cache_dir)
        cfg, flops, steps, width = prepare(preset, keys)
        ensure_experiment(f"sqlite:///{work / 'mlflow.db'}", EXPERIMENT)  # the store exists, as for a user's nth run
        timing_s = 0.05 if args.smoke_test else 1.0
        rate = gemm_rate(1024, 1024, 1024, args.threads, timing_s)
        skinny = gemm_rate(cfg.train.batch_size, width, cfg.model.feat_dim, args.threads, timing_s)
        print(f"device: cpu, {args.threads} thread(s), torch {torch.__version__}; {preset}, {steps} training steps "
              f"of {flops / 1e6:.0f} MFLOP; GEMM 1024^3 {rate / 1e9:.1f} GFLOP/s, [{cfg.train.batch_size} x {width}] "
              f"x [{width} x {cfg.model.feat_dim}] {skinny / 1e9:.1f} GFLOP/s")
        floor_s = steps * flops / rate
        print(f"compute floor: {floor_s:.1f} s ({steps} steps x {flops / 1e6:.0f} MFLOP at the 1024^3 rate)")
        if args.baseline:
            report(f"baseline {args.baseline}",
                   run_trial(Path(args.baseline).resolve(), preset, keys, work, env, args.log_model), floor_s)
        run = run_trial(REPO, preset, keys, work, env, args.log_model)
        report("this checkout", run, floor_s)
        print(f"wall_over_floor={run['wall_s'] / floor_s:.2f} steps_over_floor={run['steps_s'] / floor_s:.2f} "
              f"written_mb={run['written'] / 1e6:.0f} wall_s={run['wall_s']:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
