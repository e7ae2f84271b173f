"""What every `ablations/*.py` script shares: a declarative `AblationSpec`, its command line, and the report.

A script declares its arms (dotted overrides of COMIC), the metric columns, the paper's numbers for the same
table and, where the paper has a figure, a figure builder; `parse_args` + `run` do the rest and return the report
text for the script to print. Every table reports test-set metrics of the epoch with the best validation mAP
(`best/test/*`): the test set never picks an epoch, and all arms are selected the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comic.ablation import BACKENDS, FAILED, FINISHED, Study, StudyRun
from comic.ablation_figures import FigureFn
from comic.config import PRESETS, SMOKE_OVERRIDES, Config, ConfigError, apply_overrides, describe, load_config

if TYPE_CHECKING:
    import pandas as pd

METRIC_NOTE = ("Metrics: test-set mAP / recall in %, at the epoch with the best validation mAP (`best/test/*`); "
               "the test set never selects anything.")
STATS_NOTE = ("mean ± std: sample std (ddof 1) over the seeds that finished, n in brackets. 95% CI: Student t with "
              "n-1 degrees of freedom. diff: paired by seed against the reference arm, paired t-test p-value; "
              "'within noise' = the 95% CI of the paired difference contains 0 (equivalently p >= 0.05).")


# The columns of the paper's shot-group tables (Tables 3-5, Fig. 3): test metrics at the best-on-validation epoch.
SHOT_COLUMNS = {"total": "best/test/map", "many": "best/test/map_many", "medium": "best/test/map_medium",
                "few": "best/test/map_few"}


@dataclass(frozen=True)
class PaperTable:
    """The paper's numbers for the same table (reference `comic-method.md` §14), keyed by our arm names."""

    source: str
    columns: Sequence[str]
    rows: Mapping[str, Sequence[str]]
    note: str = ""


@dataclass
class Outcome:
    """What a figure builder gets: the spec, the per-(arm, seed) rows, the statistics and the curves."""

    spec: AblationSpec
    arms: list[str]
    rows: pd.DataFrame
    stats: pd.DataFrame
    curves: pd.DataFrame


@dataclass(frozen=True)
class AblationSpec:
    """One paper table / figure as a grid of COMIC overrides. `columns`: table label -> metric key."""

    name: str
    title: str
    variants: Mapping[str, Mapping[str, Any]]
    columns: Mapping[str, str]
    paper: PaperTable
    benchmarks: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"": {}})
    reference: str | None = None
    arm_label: str = "arm"
    figure: FigureFn | None = None
    smoke_variants: Sequence[str] | None = None  # a smaller grid for --smoke-test (None: all)

    def describe(self) -> str:
        """The arms and their overrides, for --help."""
        lines = [f"{self.title}. Arms ({self.arm_label}):"]
        arms = {**self.benchmarks, **self.variants} if len(self.variants) > 1 else self.benchmarks
        for name, overrides in arms.items():
            if name:
                text = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                for k, v in overrides.items()) or "(the base config)"
                lines.append(f"  {name:<28} {text}")
        lines.append("Columns: " + ", ".join(f"{label} = {key}" for label, key in self.columns.items()))
        return "\n".join(lines)


@dataclass
class Report:
    text: str
    failed: int = 0
    pending: int = 0

    @property
    def exit_code(self) -> int:
        """0 when every cell finished; 1 when some failed or never ran (rerun the command to retry them)."""
        return 1 if self.failed or self.pending else 0


# --------------------------------------------------------------------------------------------- command line


def build_parser(spec: AblationSpec, doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, epilog=spec.describe() + "\n\n" + METRIC_NOTE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides applied to every arm (e.g. "
                                                     "engine.device=cuda); see --list-keys")
    parser.add_argument("--preset", default="synthetic", choices=sorted(PRESETS), help="base configuration")
    parser.add_argument("--data", help="source data root (VOCdevkit / COCO root) or a built benchmark directory")
    parser.add_argument("--config", help="YAML file of config keys applied after the preset")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of every arm (default 0 1 2; smoke: 0 1)")
    parser.add_argument("--epochs", type=int, help="training epochs per cell (default: the preset's)")
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help="local: cells one after another in this process; ray: one Ray Tune grid")
    parser.add_argument("--smoke-test", action="store_true", help="tiny synthetic data, 2 seeds, 2 epochs, CPU")
    parser.add_argument("--study-dir", help=f"results, checkpoints and report (default studies/{spec.name})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                               "sqlite:///<cwd>/mlruns/mlflow.db)")
    parser.add_argument("--experiment", help=f"MLflow experiment (default ablation-{spec.name})")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="ray backend: CPUs per cell")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="ray backend: GPUs per cell (0.5 packs 2)")
    parser.add_argument("--max-concurrent", type=int, default=0, help="ray backend: cells at once (0: no limit)")
    parser.add_argument("--max-failures", type=int, default=1, help="ray backend: retries of a crashed cell")
    parser.add_argument("--shared-storage", action="store_true",
                        help="ray backend on several nodes: the study dir is on storage every node mounts (NFS)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (cells and their state) and exit")
    parser.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    return parser


def parse_args(spec: AblationSpec, doc: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser(spec, doc).parse_intermixed_args(argv)
    if args.epochs is not None and args.epochs < 1:
        build_parser(spec, doc).error(f"--epochs {args.epochs}: give at least 1")
    return args


def base_config(args: argparse.Namespace) -> Config:
    """preset -> --config file -> smoke overrides -> positional overrides -> --epochs / --data."""
    cfg = load_config(args.preset, {}, path=args.config)
    if args.smoke_test:
        cfg = apply_overrides(cfg, SMOKE_OVERRIDES)
    cfg = apply_overrides(cfg, list(args.overrides))
    extra: dict[str, Any] = {}
    if args.epochs is not None:
        extra["train.epochs"] = args.epochs
    if args.data:
        extra["data.root"] = str(Path(args.data).expanduser().resolve())
    return apply_overrides(cfg, extra)


def make_study(spec: AblationSpec, args: argparse.Namespace) -> Study:
    variants = dict(spec.variants)
    if args.smoke_test and spec.smoke_variants is not None:  # the reference arm always stays
        variants = {k: v for k, v in variants.items() if k in spec.smoke_variants or k == spec.reference}
    seeds = args.seeds if args.seeds else ([0, 1] if args.smoke_test else [0, 1, 2])
    return Study(spec.name, variants, tuple(seeds), dict(spec.benchmarks), spec.reference)


def _resources(args: argparse.Namespace) -> Any:
    if args.backend != "ray":
        return None
    try:
        from comic.tune import Resources
    except ImportError as err:
        raise ConfigError(f"--backend ray needs comic.tune (the Ray Tune runner), which failed to import: {err}; "
                          "use --backend local") from err

    return Resources(cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                     max_concurrent=args.max_concurrent)


def setup_logging() -> None:
    """For the scripts: warnings from every library, progress notes from the ablation runner."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("comic.ablation").setLevel(logging.INFO)


def run(spec: AblationSpec, args: argparse.Namespace) -> Report:
    """Run (or resume) the study the arguments describe and return its report; raises ConfigError on bad input."""
    if args.list_keys:
        return Report(describe())
    study = make_study(spec, args)
    suffix = "-smoke" if args.smoke_test else ""
    study_run = StudyRun(study, base_config(args), study_dir=args.study_dir or Path("studies") / f"{spec.name}{suffix}",
                         tracking_uri=args.tracking_uri, experiment=args.experiment or f"ablation-{spec.name}{suffix}")
    if args.dry_run:
        return Report(_plan_text(study_run))
    with study_run:
        rows = study_run.run(args.backend, resources=_resources(args), max_failures=args.max_failures,
                             shared_storage=args.shared_storage, progress=study_run.cells[0].config.engine.progress)
        return _report(spec, args, study_run, rows)


def execute(spec: AblationSpec, doc: str, argv: Sequence[str] | None = None,
            paper: Callable[[str], PaperTable] | None = None) -> tuple[int, str]:
    """A whole ablation script: parse `argv`, run the grid, compose the report -> (exit code, text to show).

    Exit code 2 with an 'error: ...' text for bad input (show it on stderr); `paper(preset)` picks the paper's table
    for the chosen preset (Table 1 has one per benchmark).
    """
    args = parse_args(spec, doc, argv)
    if paper is not None:
        spec = dataclasses.replace(spec, paper=paper(args.preset))
    setup_logging()
    try:
        report = run(spec, args)
    except ConfigError as err:
        return 2, f"error: {err}"
    return report.exit_code, report.text


def _plan_text(study_run: StudyRun) -> str:
    lines = [f"study {study_run.study.name} in {study_run.dir}: {len(study_run.cells)} cells"]
    for cell in study_run.cells:
        lines.append(f"  {cell.arm.name:<28} seed {cell.seed:<4} {cell.key}  {study_run.store.state(cell.key)}")
    lines.append(f"to run: {len(study_run.pending())}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the report


def _report(spec: AblationSpec, args: argparse.Namespace, study_run: StudyRun, rows: pd.DataFrame) -> Report:
    from comic import tables
    from comic.stats import aggregate

    arms = [a.name for a in study_run.study.arms()]
    metrics = list(spec.columns)
    stats = aggregate(rows, spec.columns, study_run.study.references(), arms)
    ours = tables.ours_table(stats, arms, metrics, first=spec.arm_label)
    diffs = tables.differences_table(stats, arms, metrics)
    cells = tables.cells_table(rows, spec.columns)
    outcome = Outcome(spec, arms, rows, stats, study_run.curves())
    figures = {f"{spec.name}.png": spec.figure(outcome)} if spec.figure is not None else {}
    text = _compose(spec, args, study_run, rows, ours, diffs, cells, figures)
    keep = [c for c in ("arm", "variant", "benchmark", "seed", "key", "state", "run_id", "run_link", "wall_s", "error",
                        *spec.columns.values()) if c in rows]
    written = study_run.publish(
        {"report.md": text, "table.md": tables.markdown(ours),
         "table.tex": tables.latex(ours, f"{spec.title} (ours; mean ± std over seeds)", f"tab:{spec.name}")},
        {"table": ours, "stats": stats, "cells": rows[keep]}, figures, _parent_metrics(stats))
    text += "\n\nFiles:\n" + "\n".join(f"  {p}" for p in written)
    state = rows["state"]
    return Report(text, failed=int((state == FAILED).sum()), pending=int((~state.isin([FINISHED, FAILED])).sum()))


def _compose(spec: AblationSpec, args: argparse.Namespace, study_run: StudyRun, rows: pd.DataFrame,
             ours: pd.DataFrame, diffs: pd.DataFrame, cells: pd.DataFrame, figures: Mapping[str, Any]) -> str:
    from comic import tables

    cfg = study_run.cells[0].config
    study = study_run.study
    ran, unique = len(study_run.executed), len({c.key for c in study_run.cells})
    failed = rows[rows["state"] == FAILED]
    parts = [
        f"== {spec.title} ==",
        f"study '{study.name}': {len(study.arms())} arms x {len(study.seeds)} seeds {list(study.seeds)} = "
        f"{unique} cells; {ran} run now (backend {args.backend}), {unique - ran} reused from {study_run.dir}",
        f"setup: preset {args.preset}{' (smoke test)' if args.smoke_test else ''}, benchmark {cfg.data.benchmark}, "
        f"backbone {cfg.model.backbone}, {cfg.train.epochs} epochs, code {study_run.code}",
        METRIC_NOTE,
    ]
    parts.append(spec.describe())
    paper = spec.paper
    parts += ["", f"PAPER - {paper.source}. Numbers reported by Zhang et al. (ICCV 2023), NOT produced by this run:",
              tables.markdown(_paper_frame(spec))]
    if paper.note:
        parts.append(paper.note)
    parts += ["", f"OURS - {cfg.data.benchmark}, mean ± std (n seeds):", tables.markdown(ours),
              "", "OURS - paired differences against the reference arm:", STATS_NOTE, tables.markdown(diffs),
              "", f"Cells (MLflow experiment '{study_run.experiment}' at {study_run.tracking_uri}; parent run "
                  f"{study_run.parent.run_id if study_run.parent else '-'}; a cell's page: "
                  f"{_link_pattern(study_run)}):",
              tables.markdown(cells)]
    if len(failed):
        parts += ["", f"{len(failed)} cell(s) FAILED (rerun the same command to retry them):"]
        parts += [f"  {r['arm']} seed {r['seed']}: {r['error']}" for r in failed.to_dict("records")]
    if figures:
        parts += ["", "Figure: " + ", ".join(figures)]
    return "\n".join(parts)


def _link_pattern(study_run: StudyRun) -> str:
    from comic.ablation import run_link

    return run_link(study_run.tracking_uri, study_run.experiment_id, "<run id>")


def _paper_frame(spec: AblationSpec) -> pd.DataFrame:
    import pandas as pd

    rows = [[name, *values] for name, values in spec.paper.rows.items()]
    return pd.DataFrame(rows, columns=[spec.arm_label, *spec.paper.columns])


def _slug(text: str) -> str:
    """MLflow metric names allow letters, digits, '_-./ ' only."""
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", text.replace("−", "-").replace("α", "alpha").replace("τ", "tau"))


def _parent_metrics(stats: pd.DataFrame) -> dict[str, float]:
    """agg/<arm>/<metric>/mean|std|n on the parent run, so the MLflow UI can sort arms."""
    out = {}
    for r in stats.to_dict("records"):
        prefix = f"agg/{_slug(r['arm'])}/{_slug(r['metric'])}"
        out |= {f"{prefix}/mean": r["mean"], f"{prefix}/std": r["std"], f"{prefix}/n": float(r["n"])}
    return {k: v for k, v in out.items() if isinstance(v, float) and math.isfinite(v)}
