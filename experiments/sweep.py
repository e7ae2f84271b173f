"""Tune COMIC with Optuna (TPE) + ASHA on Ray Tune; every trial is a child run of one MLflow parent run.

Examples:
  python experiments/sweep.py          # the embedded demo: synthetic data, local Ray, ./mlruns/mlflow.db; CPU minutes
  python experiments/sweep.py --smoke-test --confirm-top 1 --seeds 0 1          # seconds-scale end-to-end check
  python experiments/sweep.py --tune-lr --num-samples 32 --confirm-top 3 --seeds 0 1 2
  python experiments/sweep.py --resume                 # continue the latest interrupted sweep in ./ray_results
  # on the head node of `ray up ray_cluster.yaml` (RAY_ADDRESS and MLFLOW_TRACKING_URI are set there):
  python experiments/sweep.py --preset plt-coco --data ~/data/coco --storage-path s3://BUCKET/comic/ray_results \\
      --gpus-per-trial 0.5 --cpus-per-trial 4 --num-samples 64 --confirm-top 3 --seeds 0 1 2

The search space (default: the one the method registry declares for the method; for COMIC htb.alpha [0.5, 4],
rlc.tau [0.5, 0.95], mfm.gamma_neg [1, 5], mfm.gamma_pos [0, 2], loss.lambda_b [0.05, 2], loss.lambda_c [0.02, 1]
and the optimizer's lr_feature, lr_classifier, weight_decay; `--list-spaces` prints every method's) can be replaced
with --space FILE.yaml, one dotted config key per line:
  htb.alpha: [0.5, 4.0]                       # uniform
  optim.lr_feature: {loguniform: [1.0e-4, 1.0e-2]}
  model.groups: {int: [1, 4]}
  rlc.distribution: {choice: [dynamic, static]}
The base config's values (the paper's defaults) are the first trial. ASHA stops trials by val/map at epochs
grace, grace * rf, ...; the best configuration is the trial with the highest val/map at its best epoch (test
metrics are logged, never used to choose). Positional arguments (before or after the flags) are dotted overrides
of the base config, as in experiments/train.py.

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
import sys
from dataclasses import replace
from pathlib import Path

from comic.cli import base_config, config_flags, list_keys, parse, ray_flags, seeds_flag, tracking_flags
from comic.config import ConfigError
from comic.progress import finished, script_main
from comic.tracking.store import experiment_link, ui_command
from comic.tuning.cluster import Resources, is_remote_path, ray_session
from comic.tuning.results import format_confirm, format_trials
from comic.tuning.space import format_spaces, load_space, method_space, with_learning_rate
from comic.tuning.sweep import SweepResult, SweepSpec, dashboard_command, load_sweep, resolved, run_sweep

# The synthetic preset's 30-epoch schedule scaled to 10 epochs (LR steps 24/18/18/24 -> 8/6/6/8).
DEMO_SCHEDULE = {"train.epochs": 10, "optim.step_head": 8, "optim.step_tail": 6, "optim.step_balanced_feature": 6,
                 "optim.step_balanced_other": 8}
SMOKE_SWEEP = {"num_samples": 4, "grace_period": 1, "max_concurrent": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parents = [config_flags("tiny data, 2 epochs, 4 trials: seconds to a minute"),
               seeds_flag([0, 1, 2], "seeds of each confirmed configuration"), ray_flags(),
               tracking_flags("comic-sweep")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=parents)
    parser.add_argument("--full-schedule", action="store_true", help="synthetic preset: keep its 30-epoch schedule")
    search = parser.add_argument_group("search")
    search.add_argument("--space", help="search space YAML (see above); default: the method's own")
    search.add_argument("--list-spaces", action="store_true", help="print every method's search space and exit")
    search.add_argument("--tune-lr", action="store_true",
                        help="also search optim.lr_feature on a log scale over [default / 10, default * 10]")
    search.add_argument("--num-samples", type=int, help="number of trials (default 12; smoke test 4)")
    search.add_argument("--seed", type=int, default=0, help="seed of Optuna's TPE sampler (trial configs)")
    search.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped (default 2)")
    search.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep the top 1/rf at each rung")
    search.add_argument("--confirm-top", type=int, default=0, metavar="K",
                        help="afterwards rerun the best K configs with each of --seeds, without early stopping; the "
                             "confirmed best's model is registered (see --register-model)")
    search.add_argument("--register-model", metavar="NAME",
                        help="with --confirm-top: the registered model's name (default <method>-<preset>, alias "
                             "champion)")
    search.add_argument("--no-register-model", action="store_true",
                        help="with --confirm-top: log and register no model")
    run = parser.add_argument_group("the sweep's state")
    run.add_argument("--storage-path", help="Tune experiment storage: a local folder (default ./ray_results), "
                                            "s3://BUCKET/PATH, or an NFS path with --shared-storage")
    run.add_argument("--name", help="sweep name = Tune experiment and MLflow parent run (default sweep-<time>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the sweep --name (default: the latest in --storage-path) with its saved settings; "
                          "errored trials resume from their last checkpoint")
    run.add_argument("--restart-errored", action="store_true",
                     help="with --resume: restart errored trials from scratch (e.g. a checkpoint that cannot be read)")
    run.add_argument("--metrics-out", help="write the trials, the best trial and the confirmation as JSON")
    return parse(parser, argv)


def build_spec(args: argparse.Namespace) -> SweepSpec:
    """The sweep spec from the flags (a new sweep), or the saved one (--resume) with new confirmation settings."""
    confirm = {"confirm_top": args.confirm_top, "confirm_seeds": tuple(args.seeds),
               "register_model": "" if args.no_register_model else args.register_model or ""}
    if args.resume:
        if args.overrides or args.space or args.tune_lr:
            raise ConfigError("--resume continues a sweep with its saved config and space; drop the overrides, "
                              "--space and --tune-lr (or start a new sweep with another --name)")
        spec, _ = load_sweep(args.storage_path, args.name)
        return replace(spec, **confirm | {"register_model": confirm["register_model"] or spec.register_model})
    smoke = SMOKE_SWEEP if args.smoke_test else {}
    demo = DEMO_SCHEDULE if args.preset == "synthetic" and not (args.smoke_test or args.full_schedule) else {}
    base = base_config(args, demo)
    if not (args.register_model or args.no_register_model):
        confirm["register_model"] = f"{base.method}-{'smoke' if args.smoke_test else args.preset}"
    space = load_space(args.space, base) if args.space else method_space(base)
    if args.tune_lr:
        space = with_learning_rate(space, base)
    concurrent = args.max_concurrent or smoke.get("max_concurrent", 0)
    samples = args.num_samples if args.num_samples is not None else smoke.get("num_samples", 12)
    grace = args.grace_period if args.grace_period is not None else smoke.get("grace_period", 2)
    return SweepSpec(base=base, space=space, num_samples=samples, seed=args.seed, grace_period=grace,
                     reduction_factor=args.reduction_factor,
                     resources=Resources(args.cpus_per_trial, args.gpus_per_trial, concurrent),
                     max_failures=args.max_failures, storage_path=args.storage_path or "", name=args.name or "",
                     tracking_uri=args.tracking_uri, experiment=args.experiment, shared_storage=args.shared_storage,
                     **confirm)


def report(result: SweepResult, spec: SweepSpec) -> None:
    print(f"\nSweep {result.name}: {len(result.trials)} trials (Tune experiment {result.experiment_path})")
    print(format_trials(result.trials, spec.space, best=result.best))
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
        print(f"\nconfirmation: top {spec.confirm_top} with seeds {' '.join(map(str, spec.confirm_seeds))}, no "
              "early stopping (mean ± std)\n" + format_confirm(result.confirm, spec.space))
    if result.registered_model:
        print(f"\nregistered model: {result.registered_model} (the confirmed best configuration's best seed by "
              f"val/map)\n  python experiments/evaluate.py --model {result.registered_model}")
    print(f"\nMLflow parent run {result.parent_run_id} in experiment {result.experiment!r}")
    command = ui_command(result.tracking_uri)
    if command is None:
        print("  (from a laptop: the SSH tunnel in README 'On a cluster')")
    else:
        print(f"  open the UI with: {command}")
    print(f"  the runs table (expand the parent row for its trials): "
          f"{experiment_link(result.tracking_uri, result.experiment_id)}")
    if result.optuna_storage:
        print(f"Optuna study {result.name!r} (history, importances, intermediate values; ASHA stops as pruned):\n"
              f"  {dashboard_command(result.optuna_storage)}   (pip install -e '.[dashboard]')")


def write_metrics(path: str, result: SweepResult) -> None:
    payload = {"name": result.name, "parent_run_id": result.parent_run_id, "best": result.best,
               "best_config_path": result.best_config_path, "trials": result.trials, "confirm": result.confirm,
               "registered_model": result.registered_model}
    Path(path).write_text(json.dumps(payload, indent=2, default=str))


def resume_hint(where: dict[str, str], args: argparse.Namespace) -> str:
    """How to continue the sweep that `where` names (its storage path and name, known once the spec is resolved)."""
    if not where:
        return "\ninterrupted before the sweep started; nothing to resume"
    confirm = f" --confirm-top {args.confirm_top} --seeds {' '.join(map(str, args.seeds))}" if args.confirm_top else ""
    return (f"\ninterrupted; the sweep is saved. Continue it with:\n  python experiments/sweep.py --resume "
            f"--storage-path {where['storage']} --name {where['name']}{confirm}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_keys:
        print(list_keys(args))
        return 0
    if args.list_spaces:
        print(format_spaces())
        return 0
    where: dict[str, str] = {}
    return script_main(lambda: sweep(args, where), interrupted=lambda: resume_hint(where, args))


def sweep(args: argparse.Namespace, where: dict[str, str]) -> int:
    """Run (or resume) the sweep, then print its report; `where` gets the sweep's storage path and name."""
    spec = resolved(build_spec(args))
    if args.restart_errored and not args.resume:
        raise ConfigError("--restart-errored goes with --resume")
    where |= {"storage": spec.storage_path, "name": spec.name}
    with ray_session(args.address, args.num_cpus):
        result = run_sweep(spec, resume=args.resume, restart_errored=args.restart_errored)
    if args.metrics_out:
        write_metrics(args.metrics_out, result)
    finished(None)
    report(result, spec)
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
