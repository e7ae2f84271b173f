"""A study's report: the paper's table, ours (mean ± std), the paired differences, the test-image verdicts, the cells
and the figures, written to `<study dir>/report/` and to the study's parent MLflow run.

Every table reports test-set metrics of the epoch with the best validation mAP (`best/test/*`): the test set never
picks an epoch, and all arms are selected the same way. With test folds (`--folds k`) the tables come per fold and
pooled; each p-value says what it pairs (seeds on one test set), and the verdicts rest on test images and seeds.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from comic.report import tables
from comic.report.bootstrap import Bootstrapper
from comic.report.stats import aggregate, aggregate_gap
from comic.studies import verdicts
from comic.studies.figures import bars_figure
from comic.studies.runner import FAILED, FINISHED, StudyRun
from comic.studies.spec import AblationSpec, FigureFn, Outcome
from comic.tracking.store import metric_name, run_link, ui_command

METRIC_NOTE = ("Metrics: test-set mAP / recall in %, at the epoch with the best validation mAP (`best/test/*`); "
               "the test set never selects anything.")
STATS_NOTE = ("mean ± std: sample std (ddof 1) over the seeds that finished, n in brackets. 95% CI: Student t with "
              "n-1 degrees of freedom. diff: paired by seed against the reference arm on ONE test set, paired t-test "
              "p-value: it measures training noise only, not which test images were drawn; 'within noise' = the 95% "
              "CI of the paired difference contains 0 (equivalently p >= 0.05).")
UNIT_STRIDE = 1_000_000  # pooled tables pair cells by (fold, seed): unit = fold * stride + seed

# table.csv: the table in numbers (table.md holds the 'mean ± std (n)' strings).
NUMERIC_TABLE = ["arm", "metric", "mean", "std", "n", "ci_low", "ci_high"]


@dataclass
class StudyReport:
    text: str
    failed: int = 0
    pending: int = 0

    @property
    def exit_code(self) -> int:
        """0 when every cell finished; 1 when some failed or never ran (rerun the command to retry them)."""
        return 1 if self.failed or self.pending else 0




def build_report(spec: AblationSpec, args: argparse.Namespace, study_run: StudyRun,
                 rows: pd.DataFrame) -> StudyReport:
    """Compose the report of `rows` (`StudyRun.rows()`), write it with its tables and figures, and return it."""
    arms = [a.name for a in study_run.study.arms()]
    pooled = pool_units(rows)
    stats = aggregate(pooled, spec.columns, study_run.study.references(), arms)
    ours = tables.ours_table(stats, arms, list(spec.columns), first=spec.arm_label)
    second = _also_against(spec, pooled, arms)
    decided = _decide(spec, study_run, rows, arms)
    sections = _sections(spec, study_run, rows, arms, (stats, second), decided)
    gap = _gap(spec, pooled, arms)
    outcome = Outcome(spec, arms, pooled, stats, study_run.curves())
    figures = {f"{spec.name}.png": (spec.figure or _default_figure(spec))(outcome)}
    text = _compose(spec, args, study_run, rows, ours, sections, tables.cells_table(rows, spec.columns), figures)
    if gap is not None:
        text += "\n\n" + _gap_text(spec, gap, arms)
    keep = [c for c in ("arm", "variant", "benchmark", "fold", "seed", "key", "state", "run_id", "run_link", "wall_s",
                        "error", *spec.columns.values()) if c in rows]
    frames = {"table": stats[NUMERIC_TABLE], "stats": stats, "cells": rows[keep]} | {
        name: frame for name, frame in decided.items() if len(frame)} | ({} if gap is None else {"gap": gap}) | (
        {} if second is None else {"stats_also_against": second})
    written = study_run.publish(
        {"report.md": text, "table.md": tables.markdown(ours),
         "table.tex": tables.latex(ours, f"{spec.title} (ours; mean ± std over seeds)", f"tab:{spec.name}")},
        frames, figures, _parent_metrics(stats) | _verdict_metrics(decided.get("verdicts")))
    text += "\n\nFiles:\n" + "\n".join(f"  {p}" for p in written)
    state = rows["state"]
    return StudyReport(text, failed=int((state == FAILED).sum()),
                       pending=int((~state.isin([FINISHED, FAILED])).sum()))


def pool_units(rows: pd.DataFrame) -> pd.DataFrame:
    """`rows` with `seed` replaced by a (fold, seed) unit, so that the seed-keyed statistics pair cells of the same
    fold and seed (without folds every fold is 0 and the unit is the seed)."""
    if not len(rows) or "fold" not in rows:
        return rows
    return rows.assign(seed=rows["fold"].astype(int) * UNIT_STRIDE + rows["seed"].astype(int))


def _decide(spec: AblationSpec, study_run: StudyRun, rows: pd.DataFrame,
            arms: Sequence[str]) -> dict[str, pd.DataFrame]:
    """The test-image verdicts against the reference arm ('verdicts') and the spec's second arm, if any."""
    if not verdicts.bootstrap_columns(spec.columns):
        return {}
    scores, shared = study_run.test_scores(), Bootstrapper(verdicts.RESAMPLES)
    out = {"verdicts": verdicts.decide(rows, scores, spec.columns, study_run.study.references(), shared)}
    if spec.also_against in arms:
        out["verdicts_also_against"] = verdicts.decide(rows, scores, spec.columns,
                                                       {arm: spec.also_against for arm in arms}, shared)
    return out


Section = tuple[str, list[str], pd.DataFrame]


def _sections(spec: AblationSpec, study_run: StudyRun, rows: pd.DataFrame, arms: Sequence[str],
              stats: tuple[pd.DataFrame, pd.DataFrame | None], decided: Mapping[str, pd.DataFrame]) -> list[Section]:
    """The report's difference tables: without folds the seed-paired tables, then the test-image bootstrap; with
    folds the pooled verdicts first, then each fold's tables."""
    study, metrics = study_run.study, list(spec.columns)
    labels = list(verdicts.bootstrap_columns(spec.columns))
    against = {"the reference arm": "verdicts", spec.also_against: "verdicts_also_against"}
    out: list[Section] = []
    pooled_title = "test-image bootstrap (one test set)" if not study.folds else \
        f"POOLED VERDICTS over {study.folds} folds × {len(study.seeds)} seeds × test images"
    for name, key in against.items():
        if len(decided.get(key, ())):
            out.append((f"{pooled_title}, against {name}", [verdicts.RULE],
                        verdicts.pooled_table(decided[key], arms, labels, spec.arm_label)))
    if not study.folds:
        first, second = stats
        out.insert(0, ("paired differences against the reference arm", [STATS_NOTE, *_caution(study.seeds)],
                       tables.differences_table(first, arms, metrics)))
        if second is not None:
            out.insert(1, (f"paired differences against {spec.also_against}", [],
                           tables.differences_table(second, arms, metrics)))
        return out
    for fold in study.fold_ids():
        out += _fold_sections(spec, study.references(), rows[rows["fold"] == fold], fold, arms,
                              decided.get("verdicts"), labels)
    return out


def _fold_sections(spec: AblationSpec, references: Mapping[str, str | None], rows: pd.DataFrame, fold: int,
                   arms: Sequence[str], decided: pd.DataFrame | None, labels: Sequence[str]) -> list[Section]:
    stats = aggregate(rows, spec.columns, references, arms)
    out = [(f"fold {fold}: mean ± std over seeds", [], tables.ours_table(stats, arms, list(spec.columns),
                                                                          first=spec.arm_label)),
           (f"fold {fold}: paired differences by seed on fold {fold}'s test set (training noise only)",
            [STATS_NOTE] if fold == 0 else [], tables.differences_table(stats, arms, list(spec.columns)))]
    if decided is not None and len(decided):
        out.append((f"fold {fold}: Δ, 95% bootstrap CI over its test images and the seeds; seeds: the t interval "
                    "and p of the seed-paired test", [], verdicts.fold_table(decided, fold, arms, labels,
                                                                               spec.arm_label)))
    return out


def _verdict_metrics(decided: pd.DataFrame | None) -> dict[str, float]:
    """pooled/<arm>/<metric>/diff|ci_low|ci_high on the parent run."""
    if decided is None or not len(decided):
        return {}
    out = {}
    for r in decided[decided["fold"] == "pooled"].to_dict("records"):
        out |= {metric_name("pooled", r["arm"], r["metric"], k): float(r[k]) for k in ("diff", "ci_low", "ci_high")}
    return {k: v for k, v in out.items() if math.isfinite(v)}


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
             ours: pd.DataFrame, sections: Sequence[Section], cells: pd.DataFrame,
             figures: Mapping[str, Any]) -> str:
    cfg = study_run.cells[0].config
    study = study_run.study
    ran, unique = len(study_run.executed), len({c.key for c in study_run.cells})
    failed = rows[rows["state"] == FAILED]
    header = [  # separate paragraphs in report.md, separate lines on the console
        f"study '{study.name}': {len(study.arms())} arms x {len(study.seeds)} seeds {list(study.seeds)}"
        f"{f' x {study.folds} test folds' if study.folds else ''} = {unique} cells; {ran} run now (backend "
        f"{args.backend}), {unique - ran} reused from {study_run.dir}",
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
    over = f"n cells: {study.folds} folds × seeds" if study.folds else "n seeds"
    parts += ["", f"OURS - {cfg.data.benchmark}, mean ± std ({over}):", tables.markdown(ours)]
    for title, notes, table in sections:
        parts += ["", f"OURS - {title}:", *notes, tables.markdown(table)]
    parts += ["", f"Cells (MLflow experiment '{study_run.experiment}' at {study_run.tracking_uri}; parent run "
                  f"{study_run.parent.run_id if study_run.parent else '-'}; a cell's page: "
                  f"{_link_pattern(study_run)}):",
              tables.markdown(cells)]
    if len(failed):
        parts += ["", f"{len(failed)} cell(s) FAILED (rerun the same command to retry them):"]
        parts += [f"  {_cell_name(r, study.folds)}: {r['error']}" for r in failed.to_dict("records")]
    if figures:
        parts += ["", "Figure: " + ", ".join(figures)]
    return "\n".join(parts)


def _cell_name(row: Mapping[str, Any], folds: int) -> str:
    """'-HTB seed 1', or with folds '-HTB fold 2 seed 1'."""
    fold = f" fold {row['fold']}" if folds else ""
    return f"{row['arm']}{fold} seed {row['seed']}"


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


def _parent_metrics(stats: pd.DataFrame) -> dict[str, float]:
    """agg/<arm>/<metric>/mean|std|n on the parent run, so the MLflow UI can sort arms."""
    out = {}
    for r in stats.to_dict("records"):
        out |= {metric_name("agg", r["arm"], r["metric"], k): value
                for k, value in (("mean", r["mean"]), ("std", r["std"]), ("n", float(r["n"])))}
    return {k: v for k, v in out.items() if isinstance(v, float) and math.isfinite(v)}
