"""Tune COMIC with Optuna (TPE) + ASHA on Ray Tune; every trial is a child run of one MLflow parent run.

Examples:
  python experiments/sweep.py          # the embedded demo: synthetic data, local Ray, ./mlruns/mlflow.db; CPU minutes
  python experiments/sweep.py --smoke-test --confirm-top 1 --seeds 2            # seconds-scale end-to-end check
  python experiments/sweep.py --tune-lr --num-samples 32 --confirm-top 3 --seeds 3
  python experiments/sweep.py --resume                 # continue the latest interrupted sweep in ./ray_results
  # on the head node of `ray up ray_cluster.yaml` (RAY_ADDRESS and MLFLOW_TRACKING_URI are set there):
  python experiments/sweep.py --preset plt-coco --data ~/data/coco --storage-path s3://BUCKET/comic/ray_results \\
      --gpus-per-trial 0.5 --cpus-per-trial 4 --num-samples 64 --confirm-top 3 --seeds 3

The search space (default: htb.alpha [0.5, 4], rlc.tau [0.5, 0.95], mfm.gamma_neg [1, 5], mfm.gamma_pos [0, 2])
can be replaced with --space FILE.yaml, one dotted config key per line:
  htb.alpha: [0.5, 4.0]                       # uniform
  optim.lr_feature: {loguniform: [1.0e-4, 1.0e-2]}
  model.groups: {int: [1, 4]}
  rlc.distribution: {choice: [dynamic, static]}
The base config's values (the paper's defaults) are the first trial. ASHA stops trials by val/map at epochs
grace, grace * rf, ...; the best configuration is the trial with the highest val/map at its best epoch (test
metrics are logged, never used to choose). Positional arguments are dotted overrides of the base config, as in
experiments/train.py.

The synthetic preset runs a shortened schedule here (DEMO_SCHEDULE: 10 epochs with proportionally earlier LR
decays instead of 30) so the default sweep fits in minutes on a laptop; override any of it (train.epochs=30 ...)
or pass --full-schedule.

Interrupting (Ctrl-C) saves the sweep; --resume continues it without re-running or duplicating finished trials.
On a multi-node cluster --storage-path must be shared storage (s3://..., or an NFS path with --shared-storage) and
the tracking URI the head's MLflow server.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import replace
from pathlib import Path

from comic.config import PRESETS, SMOKE_OVERRIDES, ConfigError, load_config

# The synthetic preset's 30-epoch schedule scaled to 10 epochs (LR steps 24/18/18/24 -> 8/6/6/8).
DEMO_SCHEDULE = {"train.epochs": 10, "optim.step_head": 8, "optim.step_tail": 6, "optim.step_balanced_feature": 6,
                 "optim.step_balanced_other": 8}
SMOKE_SWEEP = {"num_samples": 4, "grace_period": 1, "max_concurrent": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted base-config overrides, e.g. train.epochs=20 seed=1")
    base = parser.add_argument_group("base configuration")
    base.add_argument("--preset", default="synthetic", choices=sorted(PRESETS), help="base configuration")
    base.add_argument("--data", help="source data root on every node (VOCdevkit / COCO root) or a built benchmark")
    base.add_argument("--config", help="YAML file of config keys applied after the preset")
    base.add_argument("--full-schedule", action="store_true", help="synthetic preset: keep its 30-epoch schedule")
    base.add_argument("--smoke-test", action="store_true", help="tiny data, 2 epochs, 4 trials: seconds to a minute")
    search = parser.add_argument_group("search")
    search.add_argument("--space", help="search space YAML (see above); default: alpha / tau / gamma_neg / gamma_pos")
    search.add_argument("--tune-lr", action="store_true",
                        help="also search optim.lr_feature on a log scale over [default / 10, default * 10]")
    search.add_argument("--num-samples", type=int, help="number of trials (default 12; smoke test 4)")
    search.add_argument("--seed", type=int, default=0, help="seed of Optuna's TPE sampler (trial configs)")
    search.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped (default 2)")
    search.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep the top 1/rf at each rung")
    search.add_argument("--confirm-top", type=int, default=0, metavar="K",
                        help="afterwards rerun the best K configs over --seeds seeds without early stopping")
    search.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds per confirmed config (default 3)")
    run = parser.add_argument_group("where it runs")
    run.add_argument("--address", help="Ray cluster to join ('auto' on a `ray up` head; default: $RAY_ADDRESS, "
                                       "else a new local Ray instance)")
    run.add_argument("--num-cpus", type=int, help="CPUs of a new local Ray instance (default: all cores)")
    run.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    run.add_argument("--gpus-per-trial", type=float, default=0.0,
                     help="GPUs per trial; a fraction (0.5) packs trials on one GPU, but Ray does not isolate GPU "
                          "memory: the packed trials must fit in memory together (default 0)")
    run.add_argument("--max-concurrent", type=int, help="at most this many trials at once (default: as many as "
                                                        "resources allow; smoke test 2)")
    run.add_argument("--max-failures", type=int, default=1, help="restarts of a crashed trial from its checkpoint")
    run.add_argument("--storage-path", help="Tune experiment storage: a local folder (default ./ray_results), "
                                            "s3://BUCKET/PATH, or an NFS path with --shared-storage")
    run.add_argument("--shared-storage", action="store_true",
                     help="assert that local --storage-path / SQLite paths are on a file system every node mounts")
    run.add_argument("--name", help="sweep name = Tune experiment and MLflow parent run (default sweep-<time>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the sweep --name (default: the latest in --storage-path) with its saved settings")
    track = parser.add_argument_group("tracking and output")
    track.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                              "sqlite:///<cwd>/mlruns/mlflow.db)")
    track.add_argument("--experiment", default="comic-sweep", help="MLflow experiment name")
    track.add_argument("--metrics-out", help="write the trials, the best trial and the confirmation as JSON")
    return parser.parse_args(argv)


def build_spec(args: argparse.Namespace):
    """The sweep spec from the flags (a new sweep), or the saved one (--resume) with new confirmation settings."""
    from comic.sweep import SweepSpec, load_sweep
    from comic.tune import DEFAULT_SPACE, Resources, load_space, parse_space, with_learning_rate

    confirm = {"confirm_top": args.confirm_top, "confirm_seeds": args.seeds}
    if args.resume:
        if args.overrides or args.space or args.tune_lr:
            raise ConfigError("--resume continues a sweep with its saved config and space; drop the overrides, "
                              "--space and --tune-lr (or start a new sweep with another --name)")
        spec, _ = load_sweep(args.storage_path, args.name)
        return replace(spec, **confirm)
    smoke = SMOKE_SWEEP if args.smoke_test else {}
    overrides = [f"{k}={v}" for k, v in SMOKE_OVERRIDES.items()] if args.smoke_test else []
    if args.preset == "synthetic" and not (args.smoke_test or args.full_schedule):
        overrides += [f"{k}={v}" for k, v in DEMO_SCHEDULE.items()]
    overrides += args.overrides
    if args.data:
        overrides.append(f"data.root={Path(args.data).expanduser().resolve()}")
    base = load_config(args.preset, overrides, path=args.config)
    space = load_space(args.space, base) if args.space else parse_space(DEFAULT_SPACE, base)
    if args.tune_lr:
        space = with_learning_rate(space, base)
    resources = Resources(args.cpus_per_trial, args.gpus_per_trial,
                          args.max_concurrent if args.max_concurrent is not None else smoke.get("max_concurrent", 0))
    return SweepSpec(base=base, space=space, num_samples=args.num_samples or smoke.get("num_samples", 12),
                     seed=args.seed, grace_period=args.grace_period or smoke.get("grace_period", 2),
                     reduction_factor=args.reduction_factor, resources=resources, max_failures=args.max_failures,
                     storage_path=args.storage_path or "", name=args.name or "", tracking_uri=args.tracking_uri,
                     experiment=args.experiment, shared_storage=args.shared_storage, **confirm)


def report(result, spec) -> None:
    from comic.sweep import format_confirm, format_trials
    from comic.tune import is_remote_path

    print(f"\nSweep {result.name}: {len(result.trials)} trials (Tune experiment {result.experiment_path})")
    print(format_trials(result.trials, spec.space))
    if result.best is None:
        print("no trial reported val/map; see the errors in the MLflow child runs")
    else:
        best = {k: result.best[k] for k in spec.space}
        print(f"\nbest configuration ({result.best['trial']}, val/map {result.best['val/map']:.2f} at epoch "
              f"{result.best['best_epoch']}, test/map {result.best['test/map']:.2f}):")
        print("  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items()))
        path = result.best_config_path
        if is_remote_path(path):
            print(f"  full config: {path} (also the parent run's artifact best_config.yaml); copy it here, then\n"
                  "  python experiments/train.py --config best_config.yaml")
        else:
            print(f"  train it alone: python experiments/train.py --config {path}")
    if result.confirm:
        print(f"\nconfirmation: top {spec.confirm_top} over {spec.confirm_seeds} seeds, no early stopping "
              "(mean ± std)\n" + format_confirm(result.confirm, spec.space))
    print(f"\nMLflow parent run {result.parent_run_id} in experiment {result.experiment!r}")
    if result.tracking_uri.startswith(("http://", "https://")):
        print(f"  open {result.tracking_uri} in a browser (from a laptop: the SSH tunnel in README 'On a cluster')")
    else:
        print(f"  open the UI with: mlflow ui --backend-store-uri {result.tracking_uri}")


def write_metrics(path: str, result) -> None:
    payload = {"name": result.name, "parent_run_id": result.parent_run_id, "best": result.best,
               "best_config_path": result.best_config_path, "trials": result.trials, "confirm": result.confirm}
    Path(path).write_text(json.dumps(payload, indent=2, default=str))


def resume_hint(path: str, args: argparse.Namespace) -> str:
    storage, name = Path(path).parent, re.sub(r"-confirm-top\d+x\d+$", "", Path(path).name)
    confirm = f" --confirm-top {args.confirm_top} --seeds {args.seeds}" if args.confirm_top else ""
    return (f"\ninterrupted; the sweep is saved. Continue it with:\n  python experiments/sweep.py --resume "
            f"--storage-path {storage} --name {name}{confirm}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("comic").setLevel(logging.INFO)
    from comic.sweep import run_sweep
    from comic.tune import TuneError, TuneInterrupted, ray_session

    try:
        spec = build_spec(args)
        spec.check()
    except (ValueError, TuneError) as err:  # ConfigError included: a bad flag, override or space names itself
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        with ray_session(args.address, args.num_cpus):
            result = run_sweep(spec, resume=args.resume)
    except (ConfigError, TuneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TuneInterrupted as stop:
        print(resume_hint(stop.path, args), file=sys.stderr)
        return 130
    report(result, spec)
    if args.metrics_out:
        write_metrics(args.metrics_out, result)
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
