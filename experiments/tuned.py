"""Equal-budget tuning, one command: every arm tuned with the same budget, compared tuned-for-tuned over test folds.

Per test fold and arm: one Optuna (TPE) + ASHA sweep over the arm's own search space (declared with its method in the
registry: `python experiments/sweep.py --list-spaces`), objective val/map, the same budget for every arm (--trials
trials of at most train.epochs epochs, asserted equal); the --top-k configurations confirmed over --seeds at full
length beside the arm's default configuration; the tuned arm = the confirmed best on validation. Selection never
sees the test photos of the fold it is reported on. The report (printed, and in <study dir>/report/tuned.md): the
default and tuned tables with pooled verdicts over folds, seeds and test images, "Δ from tuning" per arm, and the
val→test agreement (Spearman over every sweep trial).

Arms (default: all): COMIC, -HTB (COMIC without HTB: alpha and lambda_b not searched), BCE, ASL, DB, Pseudo-Label,
SPLC, Hill, and BCE (full labels), the ceiling (tuned too).

Examples:
  python experiments/tuned.py --smoke-test                          # seconds-scale: 2 arms, 2 trials, 2 epochs
  python experiments/tuned.py --preset voc2007-dev-lt --data ~/data/VOCdevkit --folds 3 --trials 8 --top-k 2 \\
      --seeds 0 1 2 --study-dir studies/tuned-mobilenet
  python experiments/tuned.py --preset voc2007-dev-lt-effnet --data ~/data/VOCdevkit \\
      model.weights=~/weights/tf_efficientnet_lite2-5b71a564.pth --folds 3 --study-dir studies/tuned-effnet
Rerunning the same command runs nothing that finished (0 trials, 0 cells) and resumes what was interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from comic.cli import base_config, config_flags, list_keys, parse, ray_flags, seeds_flag, tracking_flags
from comic.progress import finished, script_main
from comic.studies.cli import STUDY_LOGGERS, plan_label
from comic.studies.tuned import ARMS, Budget, TunedStudy, run_study
from comic.studies.tuned_report import build
from comic.tracking.store import ui_command
from comic.tuning.cluster import Resources, ray_session

SMOKE_ARMS = ("BCE", "ASL")
SMOKE_BUDGET = {"trials": 2, "grace_period": 1, "top_k": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parents = [config_flags("tiny synthetic data: 2 arms, 2 folds, 2 trials of 2 epochs, 1 seed"),
               seeds_flag(None, "seeds of each confirmed configuration (default 0 1 2; smoke test 0)"),
               tracking_flags(None), ray_flags()]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=parents)
    group = parser.add_argument_group("the study")
    group.add_argument("--arm", dest="arms", action="append", metavar="ARM", choices=[a.name for a in ARMS],
                       help="tune only this arm (repeat for several; COMIC is always in: every verdict compares "
                            "with it). Write --arm=-HTB for a name that starts with '-'")
    group.add_argument("--folds", type=int, default=None, metavar="K",
                       help="disjoint test folds (data.folds; default 3, smoke test 2; 0: the benchmark's test set)")
    group.add_argument("--trials", type=int, help="sweep trials per arm and fold (default 8; smoke test 2)")
    group.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped (default 5)")
    group.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep the top 1/rf at each rung")
    group.add_argument("--top-k", type=int, help="configurations confirmed per arm and fold (default 2)")
    group.add_argument("--sampler-seed", type=int, default=0, help="seed of every arm's TPE sampler")
    group.add_argument("--study-dir", help="sweeps, cells and report (default studies/tuned[-smoke])")
    group.add_argument("--name", default="tuned", help="study name = its MLflow experiment (smoke test: <name>-smoke)")
    return parse(parser, argv)


def make_study(args: argparse.Namespace) -> TunedStudy:
    base = base_config(args)
    smoke = SMOKE_BUDGET if args.smoke_test else {}
    budget = Budget(trials=args.trials or smoke.get("trials", 8), epochs=base.train.epochs,
                    grace_period=args.grace_period or smoke.get("grace_period", 5),
                    reduction_factor=args.reduction_factor, top_k=args.top_k or smoke.get("top_k", 2),
                    seeds=tuple(args.seeds or ([0] if args.smoke_test else [0, 1, 2])), sampler_seed=args.sampler_seed)
    names = set(args.arms or (SMOKE_ARMS if args.smoke_test else [a.name for a in ARMS])) | {"COMIC"}
    folds = args.folds if args.folds is not None else (2 if args.smoke_test else 3)
    suffix = "-smoke" if args.smoke_test else ""
    return TunedStudy(name=args.name + suffix, base=base, budget=budget,
                      study_dir=Path(args.study_dir or f"studies/tuned{suffix}"),
                      arms=[a for a in ARMS if a.name in names], folds=folds, tracking_uri=args.tracking_uri,
                      experiment=args.experiment or "", label=plan_label(args),
                      resources=Resources(args.cpus_per_trial, args.gpus_per_trial, args.max_concurrent))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_keys:
        print(list_keys(args))
        return 0
    return script_main(lambda: _run(args), verbose=STUDY_LOGGERS, interrupted=lambda: (
        "\ninterrupted; finished sweeps and cells are kept. Continue with the same command:\n  " + " ".join(sys.argv)))


def _run(args: argparse.Namespace) -> int:
    study = make_study(args)
    with ray_session(args.address, args.num_cpus):
        result = run_study(study)
    report = build(result, study)
    finished(None)
    print(report.text)
    print(f"\nreport: {study.study_dir / 'report' / 'tuned.md'}; MLflow parent run {result.parent_run_id} in "
          f"experiment {study.experiment!r}")
    command = ui_command(study.tracking_uri)
    if command:
        print(f"  open the UI with: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
