"""The command line every `ablations/*.py` script shares, and its report: parse the flags, run (or resume) the
study's grid, and compose the paper's table, ours (mean ± std over seeds), the paired differences and the cells.

Every table reports test-set metrics of the epoch with the best validation mAP (`best/test/*`): the test set never
picks an epoch, and all arms are selected the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from comic._io import UserError
from comic.cli import base_config, config_flags, list_keys, parse, ray_flags, seeds_flag, tracking_flags
from comic.config import EXECUTION_KEYS
from comic.progress import finished, script_main
from comic.studies.plan import Study
from comic.studies.report import METRIC_NOTE, StudyReport, build_report
from comic.studies.runner import BACKENDS, StudyRun
from comic.studies.spec import AblationSpec, PaperTable
from comic.tuning.cluster import Resources, ray_session

STUDY_LOGGERS = ("comic.studies", "comic.tuning.callbacks")  # the study runner, and each Ray trial (backend ray)


def build_parser(spec: AblationSpec, doc: str) -> argparse.ArgumentParser:
    parents = [config_flags("tiny synthetic data, 2 seeds, 2 epochs, CPU: seconds"),
               seeds_flag(None, "seeds of every arm (default 0 1 2; smoke test 0 1)"), tracking_flags(None),
               ray_flags()]
    parser = argparse.ArgumentParser(description=doc, epilog=spec.describe() + "\n\n" + METRIC_NOTE, parents=parents,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("the study")
    group.add_argument("--backend", choices=BACKENDS, default="local",
                       help="local: cells one after another in this process; ray: one Ray Tune grid")
    group.add_argument("--study-dir", help=f"results, checkpoints and report (default studies/{spec.name})")
    group.add_argument("--arm", dest="arms", action="append", metavar="ARM",
                       help="run only this arm (a name listed below; repeat for several; the reference arm always "
                            "runs). Write --arm=-HTB for a name that starts with '-'")
    group.add_argument("--folds", type=int, default=0, metavar="K",
                       help="run every arm and seed on each of K >= 2 disjoint test folds of the pool and test images "
                            "together (data.folds; cells = arms x seeds x K): per-fold tables, and verdicts pooled "
                            "over folds, seeds and test images. Default 0: the benchmark's own test set")
    group.add_argument("--dry-run", action="store_true", help="print the plan (cells and their state) and exit")
    group.add_argument("--log-models", action="store_true",
                       help="log each cell's best-on-val model as its run's MLflow model (off: ~40 MB per cell)")
    return parser


def make_study(spec: AblationSpec, args: argparse.Namespace) -> Study:
    variants, benchmarks = dict(spec.variants), dict(spec.benchmarks)
    if args.smoke_test and spec.smoke_variants is not None:  # the reference arm always stays
        variants = {k: v for k, v in variants.items() if k in spec.smoke_variants or k == spec.reference}
    if args.arms and len(variants) > 1:
        variants = _chosen(variants, args.arms, spec.reference)
    elif args.arms:  # the arms are the benchmark variants (Table 3's missing rates)
        benchmarks = _chosen(benchmarks, args.arms, spec.reference)
    seeds = args.seeds if args.seeds else ([0, 1] if args.smoke_test else [0, 1, 2])
    return Study(spec.name, variants, tuple(seeds), benchmarks, spec.reference, folds=args.folds)


def _chosen(arms: dict[str, Any], names: Sequence[str], reference: str | None) -> dict[str, Any]:
    unknown = [a for a in names if a not in arms]
    if unknown:
        raise UserError(f"--arm: no arm {', '.join(map(repr, unknown))} in this study; its arms are "
                        f"{', '.join(map(repr, arms))}")
    return {k: v for k, v in arms.items() if k in names or k == reference}


def plan_label(args: argparse.Namespace) -> str:
    """The preset and the overrides that change what is computed (`voc2007-dev-lt data.split_seed=1`), paths cut to
    their file names: two plans of one study (another split, another preset) get told apart in MLflow's runs table."""
    pairs = (item.strip().partition("=") for item in args.overrides)
    shown = [f"{key}={Path(value).name if '/' in value else value}" for key, _, value in pairs
             if key.strip() not in EXECUTION_KEYS]
    folds = [f"folds={args.folds}"] if args.folds else []
    return " ".join(["smoke-test" if args.smoke_test else args.preset, *shown, *folds])


def run(spec: AblationSpec, args: argparse.Namespace) -> StudyReport:
    """Run (or resume) the study the arguments describe and return its report; raises ConfigError on bad input."""
    if args.list_keys:
        return StudyReport(list_keys(args))
    study = make_study(spec, args)
    suffix = "-smoke" if args.smoke_test else ""
    study_run = StudyRun(study, base_config(args), study_dir=args.study_dir or Path("studies") / f"{spec.name}{suffix}",
                         tracking_uri=args.tracking_uri, experiment=args.experiment or f"ablation-{spec.name}{suffix}",
                         title=spec.title, label=plan_label(args), log_models=args.log_models)
    if args.dry_run:
        return StudyReport(_plan_text(study_run))
    resources = Resources(args.cpus_per_trial, args.gpus_per_trial, args.max_concurrent)
    ray = ray_session(args.address, args.num_cpus) if args.backend == "ray" else contextlib.nullcontext()
    with ray, study_run:
        rows = study_run.run(args.backend, resources=resources, max_failures=args.max_failures,
                             shared_storage=args.shared_storage, progress=study_run.cells[0].config.engine.progress)
        return build_report(spec, args, study_run, rows)


def main(spec: AblationSpec, doc: str, argv: Sequence[str] | None = None,
         paper: Callable[[str], PaperTable] | None = None) -> int:
    """A whole ablation script under `script_main`'s contract: parse `argv`, run the grid, print the report; returns
    the exit code. `paper(preset)` picks the paper's table for the chosen preset (Table 1 has one per benchmark)."""
    args = parse(build_parser(spec, doc), argv)
    if paper is not None:
        spec = dataclasses.replace(spec, paper=paper(args.preset))

    def body() -> int:
        report = run(spec, args)
        finished(None)
        print(report.text)
        return report.exit_code

    return script_main(body, verbose=STUDY_LOGGERS, interrupted=lambda: "\ninterrupted; finished cells are kept. "
                       "Continue with the same command (interrupted cells resume from their checkpoints).")


def _plan_text(study_run: StudyRun) -> str:
    lines = [f"study {study_run.study.name} in {study_run.dir}: {len(study_run.cells)} cells"]
    for cell in study_run.cells:
        fold = f"fold {cell.fold:<3} " if study_run.study.folds else ""
        lines.append(f"  {cell.arm.name:<28} {fold}seed {cell.seed:<4} {cell.key}  {study_run.store.state(cell.key)}")
    lines.append(f"to run: {len(study_run.pending())}")
    return "\n".join(lines)


