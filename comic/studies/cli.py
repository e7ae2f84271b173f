"""The command line every `ablations/*.py` script shares, and its report: parse the flags, run (or resume) the
study's grid, and compose the paper's table, ours (mean ± std over seeds), the paired differences and the cells.

Every table reports test-set metrics of the epoch with the best validation mAP (`best/test/*`): the test set never
picks an epoch, and all arms are selected the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from comic._io import UserError
from comic.cli import base_config, config_flags, list_keys, parse, ray_flags, seeds_flag, tracking_flags
from comic.config import EXECUTION_KEYS
from comic.report import tables
from comic.report.stats import aggregate, aggregate_gap
from comic.studies.figures import bars_figure
from comic.studies.plan import Study
from comic.studies.runner import BACKENDS, FAILED, FINISHED, StudyRun
from comic.studies.spec import AblationSpec, FigureFn, Outcome, PaperTable
from comic.tracking.store import run_link, ui_command
from comic.tuning.cluster import Resources, ray_session

METRIC_NOTE = ("Metrics: test-set mAP / recall in %, at the epoch with the best validation mAP (`best/test/*`); "
               "the test set never selects anything.")
STATS_NOTE = ("mean ± std: sample std (ddof 1) over the seeds that finished, n in brackets. 95% CI: Student t with "
              "n-1 degrees of freedom. diff: paired by seed against the reference arm, paired t-test p-value; "
              "'within noise' = the 95% CI of the paired difference contains 0 (equivalently p >= 0.05).")


# table.csv: the table in numbers (table.md holds the 'mean ± std (n)' strings).
NUMERIC_TABLE = ["arm", "metric", "mean", "std", "n", "ci_low", "ci_high"]


@dataclass
class Report:
    text: str
    failed: int = 0
    pending: int = 0

    @property
    def exit_code(self) -> int:
        """0 when every cell finished; 1 when some failed or never ran (rerun the command to retry them)."""
        return 1 if self.failed or self.pending else 0




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
    return Study(spec.name, variants, tuple(seeds), benchmarks, spec.reference)


def _chosen(arms: dict[str, Any], names: Sequence[str], reference: str | None) -> dict[str, Any]:
    unknown = [a for a in names if a not in arms]
    if unknown:
        raise UserError(f"--arm: no arm {', '.join(map(repr, unknown))} in this study; its arms are "
                        f"{', '.join(map(repr, arms))}")
    return {k: v for k, v in arms.items() if k in names or k == reference}


def setup_logging() -> None:
    """For the scripts: warnings from every library, progress notes from the study runner."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for room in ("comic.studies", "comic.tuning.callbacks"):  # the study runner, and each Ray trial (backend ray)
        logging.getLogger(room).setLevel(logging.INFO)


def plan_label(args: argparse.Namespace) -> str:
    """The preset and the overrides that change what is computed (`voc2007-dev-lt data.split_seed=1`), paths cut to
    their file names: two plans of one study (another split, another preset) get told apart in MLflow's runs table."""
    pairs = (item.strip().partition("=") for item in args.overrides)
    shown = [f"{key}={Path(value).name if '/' in value else value}" for key, _, value in pairs
             if key.strip() not in EXECUTION_KEYS]
    return " ".join(["smoke-test" if args.smoke_test else args.preset, *shown])


def run(spec: AblationSpec, args: argparse.Namespace) -> Report:
    """Run (or resume) the study the arguments describe and return its report; raises ConfigError on bad input."""
    if args.list_keys:
        return Report(list_keys(args))
    study = make_study(spec, args)
    suffix = "-smoke" if args.smoke_test else ""
    study_run = StudyRun(study, base_config(args), study_dir=args.study_dir or Path("studies") / f"{spec.name}{suffix}",
                         tracking_uri=args.tracking_uri, experiment=args.experiment or f"ablation-{spec.name}{suffix}",
                         title=spec.title, label=plan_label(args), log_models=args.log_models)
    if args.dry_run:
        return Report(_plan_text(study_run))
    resources = Resources(args.cpus_per_trial, args.gpus_per_trial, args.max_concurrent)
    ray = ray_session(args.address, args.num_cpus) if args.backend == "ray" else contextlib.nullcontext()
    with ray, study_run:
        rows = study_run.run(args.backend, resources=resources, max_failures=args.max_failures,
                             shared_storage=args.shared_storage, progress=study_run.cells[0].config.engine.progress)
        return _report(spec, args, study_run, rows)


def execute(spec: AblationSpec, doc: str, argv: Sequence[str] | None = None,
            paper: Callable[[str], PaperTable] | None = None) -> tuple[int, str]:
    """A whole ablation script: parse `argv`, run the grid, compose the report -> (exit code, text to show).

    Exit code 2 with an 'error: ...' text for bad input (show it on stderr); `paper(preset)` picks the paper's table
    for the chosen preset (Table 1 has one per benchmark).
    """
    args = parse(build_parser(spec, doc), argv)
    if paper is not None:
        spec = dataclasses.replace(spec, paper=paper(args.preset))
    setup_logging()
    try:
        report = run(spec, args)
    except UserError as err:  # a bad flag, key, file or folder: one line that says what to do
        return 2, f"error: {err}"
    return report.exit_code, report.text


def main(spec: AblationSpec, doc: str, argv: Sequence[str] | None = None,
         paper: Callable[[str], PaperTable] | None = None) -> int:
    """`execute`, printed: the report on stdout, an 'error: ...' line on stderr; returns the exit code."""
    code, text = execute(spec, doc, argv, paper)
    print(text, file=sys.stderr if code == 2 else sys.stdout)
    return code


def _plan_text(study_run: StudyRun) -> str:
    lines = [f"study {study_run.study.name} in {study_run.dir}: {len(study_run.cells)} cells"]
    for cell in study_run.cells:
        lines.append(f"  {cell.arm.name:<28} seed {cell.seed:<4} {cell.key}  {study_run.store.state(cell.key)}")
    lines.append(f"to run: {len(study_run.pending())}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the report


def _report(spec: AblationSpec, args: argparse.Namespace, study_run: StudyRun, rows: pd.DataFrame) -> Report:
    arms = [a.name for a in study_run.study.arms()]
    metrics = list(spec.columns)
    stats = aggregate(rows, spec.columns, study_run.study.references(), arms)
    ours = tables.ours_table(stats, arms, metrics, first=spec.arm_label)
    diffs = {"the reference arm": tables.differences_table(stats, arms, metrics)}
    second = _also_against(spec, rows, arms)
    if second is not None:
        diffs[spec.also_against] = tables.differences_table(second, arms, metrics)
    cells = tables.cells_table(rows, spec.columns)
    gap = _gap(spec, rows, arms)
    outcome = Outcome(spec, arms, rows, stats, study_run.curves())
    figures = {f"{spec.name}.png": (spec.figure or _default_figure(spec))(outcome)}
    text = _compose(spec, args, study_run, rows, ours, diffs, cells, figures)
    if gap is not None:
        text += "\n\n" + _gap_text(spec, gap, arms)
    keep = [c for c in ("arm", "variant", "benchmark", "seed", "key", "state", "run_id", "run_link", "wall_s", "error",
                        *spec.columns.values()) if c in rows]
    written = study_run.publish(
        {"report.md": text, "table.md": tables.markdown(ours),
         "table.tex": tables.latex(ours, f"{spec.title} (ours; mean ± std over seeds)", f"tab:{spec.name}")},
        {"table": stats[NUMERIC_TABLE], "stats": stats, "cells": rows[keep]} | ({} if gap is None else {"gap": gap})
        | ({} if second is None else {"stats_also_against": second}),
        figures, _parent_metrics(stats))
    text += "\n\nFiles:\n" + "\n".join(f"  {p}" for p in written)
    state = rows["state"]
    return Report(text, failed=int((state == FAILED).sum()), pending=int((~state.isin([FINISHED, FAILED])).sum()))


def _default_figure(spec: AblationSpec) -> FigureFn:
    """Bars of total and few-shot mAP (those the spec has; else its first column) for a spec that draws nothing else."""
    metrics = tuple(m for m in ("total", "few") if m in spec.columns) or (next(iter(spec.columns)),)
    return bars_figure(f"{spec.title}: test mAP (%) by {spec.arm_label}", metrics)


def _also_against(spec: AblationSpec, rows: pd.DataFrame, arms: Sequence[str]) -> pd.DataFrame | None:
    """Every arm paired with `spec.also_against` too, when the spec names one and it is in the grid."""
    if spec.also_against not in arms:
        return None
    return aggregate(rows, spec.columns, {arm: spec.also_against for arm in arms}, arms)


def _gap(spec: AblationSpec, rows: pd.DataFrame, arms: Sequence[str]) -> pd.DataFrame | None:
    """The % of the floor-to-ceiling gap each arm closes, when the spec names both arms and both are in the grid."""
    if spec.gap is None or not set(spec.gap) <= set(arms):
        return None
    return aggregate_gap(rows, {c: spec.columns[c] for c in spec.gap_columns if c in spec.columns}, *spec.gap, arms)


def _gap_text(spec: AblationSpec, gap: pd.DataFrame, arms: Sequence[str]) -> str:
    floor, ceiling = spec.gap
    return "\n".join([
        f"OURS - position between the floor ({floor}) and the ceiling ({ceiling}): % of the gap closed, per seed "
        f"100 · (arm − floor) / (ceiling − floor), mean ± std (n seeds); 0 = floor, 100 = ceiling. Shot groups "
        "follow each arm's own observed training counts, so a group column compares slightly different class sets "
        "when the arms' labels differ.",
        tables.markdown(tables.ours_table(gap, arms, list(dict.fromkeys(gap["metric"])), first=spec.arm_label))])


def _compose(spec: AblationSpec, args: argparse.Namespace, study_run: StudyRun, rows: pd.DataFrame,
             ours: pd.DataFrame, diffs: Mapping[str, pd.DataFrame], cells: pd.DataFrame,
             figures: Mapping[str, Any]) -> str:
    cfg = study_run.cells[0].config
    study = study_run.study
    ran, unique = len(study_run.executed), len({c.key for c in study_run.cells})
    failed = rows[rows["state"] == FAILED]
    header = [  # separate paragraphs in report.md, separate lines on the console
        f"study '{study.name}': {len(study.arms())} arms x {len(study.seeds)} seeds {list(study.seeds)} = "
        f"{unique} cells; {ran} run now (backend {args.backend}), {unique - ran} reused from {study_run.dir}",
        f"setup: preset {args.preset}{' (smoke test)' if args.smoke_test else ''}, benchmark {cfg.data.benchmark}, "
        f"backbone {cfg.model.backbone}, {cfg.train.epochs} epochs, code {study_run.code}",
        METRIC_NOTE,
    ]
    parts = [f"== {spec.title} ==", "", "\n\n".join(header), "", "```", spec.describe(), "```"]
    paper = spec.paper
    if paper is not None:
        parts += ["", f"PAPER - {paper.source}. Numbers reported by Zhang et al. (ICCV 2023), NOT produced by this "
                      "run:", tables.markdown(_paper_frame(spec))]
        if paper.note:
            parts.append(paper.note)
    parts += ["", f"OURS - {cfg.data.benchmark}, mean ± std (n seeds):", tables.markdown(ours)]
    for i, (against, table) in enumerate(diffs.items()):
        note = [STATS_NOTE, *_caution(study.seeds)] if i == 0 else []
        parts += ["", f"OURS - paired differences against {against}:", *note, tables.markdown(table)]
    parts += ["", f"Cells (MLflow experiment '{study_run.experiment}' at {study_run.tracking_uri}; parent run "
                  f"{study_run.parent.run_id if study_run.parent else '-'}; a cell's page: "
                  f"{_link_pattern(study_run)}):",
              tables.markdown(cells)]
    if len(failed):
        parts += ["", f"{len(failed)} cell(s) FAILED (rerun the same command to retry them):"]
        parts += [f"  {r['arm']} seed {r['seed']}: {r['error']}" for r in failed.to_dict("records")]
    if figures:
        parts += ["", "Figure: " + ", ".join(figures)]
    return "\n".join(parts)


def _caution(seeds: Sequence[int]) -> list[str]:
    if len(seeds) >= tables.FEW_PAIRS:
        return []
    return [f"CAUTION: {len(seeds)} seed(s) per arm. A paired test on fewer than {tables.FEW_PAIRS} differences says "
            "little ('real?' below is a hint, not a finding): rerun with --seeds 0 1 2 3 4 before concluding."]


def _link_pattern(study_run: StudyRun) -> str:
    link = run_link(study_run.tracking_uri, study_run.experiment_id, "<run id>")
    command = ui_command(study_run.tracking_uri)
    return link if command is None else f"{link}, once `{command}` serves the store"


def _paper_frame(spec: AblationSpec) -> pd.DataFrame:
    rows = [[name, *values] for name, values in spec.paper.rows.items()]
    return pd.DataFrame(rows, columns=[spec.arm_label, *spec.paper.columns])


def _slug(text: str) -> str:
    """Metric-name parts of letters, digits and '_-.' only (MLflow allows spaces, but they break its search
    syntax and cut chart titles): '-RLC', 'total_mAP', 'lambda_b_0.1'."""
    text = text.replace("−", "-").replace("α", "alpha").replace("τ", "tau").replace("λ", "lambda")
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_.\-]", "_", text)).strip("_")


def _parent_metrics(stats: pd.DataFrame) -> dict[str, float]:
    """agg/<arm>/<metric>/mean|std|n on the parent run, so the MLflow UI can sort arms."""
    out = {}
    for r in stats.to_dict("records"):
        prefix = f"agg/{_slug(r['arm'])}/{_slug(r['metric'])}"
        out |= {f"{prefix}/mean": r["mean"], f"{prefix}/std": r["std"], f"{prefix}/n": float(r["n"])}
    return {k: v for k, v in out.items() if isinstance(v, float) and math.isfinite(v)}
