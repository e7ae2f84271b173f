"""The tuned study's report: default and tuned tables side by side with pooled verdicts over folds, seeds and test
images (`comic.studies.verdicts`), "Δ from tuning" per arm, the val→test agreement of the sweeps, the budget
actually spent and the selected configurations.

Verdicts (as every study's): Δ = arm − reference, the mean over folds of the per-fold mean over seeds; its 95 % CI
from the paired two-level bootstrap (test images, then seeds), stratified by fold; **holds** when the CI excludes 0
and every fold agrees in sign, **mixed** when folds disagree, else **within noise**.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from comic._io import atomic_write_text
from comic.report import tables
from comic.report.bootstrap import Bootstrapper
from comic.report.stats import summarize
from comic.studies.runner import FINISHED
from comic.studies.tuned import SWEEP_METRIC, TunedResult, TunedStudy, default_name, top_configs, top_name
from comic.studies.verdicts import RESAMPLES, RULE, decide, pooled_table

COLUMNS = {"total mAP": "best/test/map", "few mAP": "best/test/map_few", "average mAP": "best/test/map_avg"}
REFERENCE = "COMIC"


def tuned_name(arm: str) -> str:
    return f"{arm} tuned"


def comparison_rows(result: TunedResult, study: TunedStudy) -> pd.DataFrame:
    """The finished cells as arms '<arm> default' and '<arm> tuned' (on each fold, the rank `select` chose)."""
    done = result.cells[result.cells["state"] == FINISHED]
    parts = []
    for arm in study.arms:
        parts.append(done[done["arm"] == default_name(arm.name)])
        for fold in study.fold_ids():
            rank = result.chosen.get((arm.name, fold))
            if rank is not None:
                picked = done[(done["arm"] == top_name(arm.name, rank)) & (done["fold"] == fold)]
                parts.append(picked.assign(arm=tuned_name(arm.name)))
    return pd.concat(parts, ignore_index=True) if parts else done.iloc[:0]


@dataclass
class TunedReport:
    text: str
    verdicts: pd.DataFrame


def build(result: TunedResult, study: TunedStudy) -> TunedReport:
    """Compose the report and write it to `<study dir>/report/` (tuned.md, tuned_verdicts.csv, trials.csv)."""
    scores = result.scores
    rows = comparison_rows(result, study)
    arms = [a.name for a in study.arms]
    boot = Bootstrapper(RESAMPLES)
    pairs = {"tuning": {tuned_name(a): default_name(a) for a in arms},
             "tuned": {tuned_name(a): tuned_name(REFERENCE) for a in arms if a != REFERENCE},
             "default": {default_name(a): default_name(REFERENCE) for a in arms if a != REFERENCE}}
    decided = {what: decide(rows, scores, COLUMNS, refs, boot) for what, refs in pairs.items()}
    labels = list(COLUMNS)
    sections = [
        _header(study, result),
        "## Δ from tuning (tuned − default, the same arm)\n\n" + tables.markdown(_means(rows, arms))
        + "\n\n" + tables.markdown(pooled_table(decided["tuning"], list(pairs["tuning"]), labels, "arm")),
        f"## Tuned for tuned: each tuned arm − {tuned_name(REFERENCE)}\n\n"
        + tables.markdown(pooled_table(decided["tuned"], list(pairs["tuned"]), labels, "arm")),
        f"## At default settings: each arm − {default_name(REFERENCE)}\n\n"
        + tables.markdown(pooled_table(decided["default"], list(pairs["default"]), labels, "arm")),
        "## Validation → test agreement over all sweep trials (Spearman ρ of val/map and test/map)\n\n"
        + tables.markdown(agreement(result, arms)),
        "## Budget spent and configurations selected\n\n" + tables.markdown(_budget(result, study)),
        f"Verdicts: {RULE}",
    ]
    verdicts = pd.concat([d.assign(comparison=w) for w, d in decided.items() if len(d)], ignore_index=True) \
        if any(len(d) for d in decided.values()) else pd.DataFrame()
    text = "\n\n".join(sections)
    folder = study.study_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "tuned.md", text + "\n")
    atomic_write_text(folder / "tuned_verdicts.csv", verdicts.to_csv(index=False))
    write_trials(result, folder / "trials.csv")
    return TunedReport(text, verdicts)


def _header(study: TunedStudy, result: TunedResult) -> str:
    trials, epochs = result.budget
    folds = f"{study.folds} test folds" if study.folds else "the benchmark's test set"
    return (f"# Tuned study `{study.name}` {study.label}\n\nEvery arm: one Optuna TPE + ASHA sweep over its own "
            f"space per fold, **{trials} trials × ≤ {epochs} epochs** (equal for all arms, checked), objective "
            f"val/map; top {study.budget.top_k} confirmed over seeds {list(study.budget.seeds)} at {epochs} epochs; "
            f"tuned = the confirmed best on validation. On {folds}; test photos of a fold never select anything. "
            f"This run: {result.trials_run} sweep trials and {result.cells_run} confirmation cells executed.")


def _means(rows: pd.DataFrame, arms: Sequence[str]) -> pd.DataFrame:
    """arm × (default, tuned): total mAP mean ± std over every (fold, seed) cell."""
    out = []
    for arm in arms:
        line: dict[str, Any] = {"arm": arm}
        for kind, name in (("default", default_name(arm)), ("tuned", tuned_name(arm))):
            values = rows.loc[rows["arm"] == name, COLUMNS["total mAP"]].dropna().tolist()
            s = summarize(values)
            line[f"{kind} total mAP"] = tables.mean_std(s.mean, s.std, s.n) if values else tables.DASH
        out.append(line)
    return pd.DataFrame(out)


def agreement(result: TunedResult, arms: Sequence[str]) -> pd.DataFrame:
    """Per arm and over all arms: Spearman ρ between a sweep trial's val/map and its test/map (at its best epoch),
    over the trials of every fold's sweep."""
    pooled: list[tuple[float, float]] = []
    out = []
    for arm in [*arms, "all arms"]:
        pairs = pooled if arm == "all arms" else _pairs(result, arm)
        if arm != "all arms":
            pooled += pairs
        x = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
        rho, p = stats.spearmanr(x[:, 0], x[:, 1]) if len(x) > 2 else (np.nan, np.nan)
        out.append({"arm": arm, "trials": len(x), "Spearman ρ": tables.number(float(rho), 3),
                    "p": tables.number(float(p), 2)})
    return pd.DataFrame(out)


def _pairs(result: TunedResult, arm: str) -> list[tuple[float, float]]:
    return [(float(r[SWEEP_METRIC]), float(r["test/map"])) for (a, _), rows in result.trials.items() if a == arm
            for r in rows if np.isfinite(r.get(SWEEP_METRIC, np.nan)) and np.isfinite(r.get("test/map", np.nan))]


def _budget(result: TunedResult, study: TunedStudy) -> pd.DataFrame:
    out = []
    for arm in study.arms:
        space = list(study.space(arm))
        for fold in study.fold_ids():
            rows = result.trials.get((arm.name, fold), [])
            rank = result.chosen.get((arm.name, fold))
            tops = top_configs(rows, space, study.budget.top_k)
            config = tops[min(rank, len(tops)) - 1] if rank and tops else {}
            out.append({"arm": arm.name, "fold": fold, "trials": len(rows),
                        "epochs run": int(sum(int(r.get("epochs", 0) or 0) for r in rows)),
                        "chosen": f"top{rank}" if rank else tables.DASH,
                        "configuration": " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in config.items())})
    return pd.DataFrame(out)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_trials(result: TunedResult, path: Path) -> None:
    """Every sweep trial (arm, fold, its configuration, val/map, test/map, epochs) as one CSV."""
    frame = pd.DataFrame([{"arm": a, "fold": f} | r for (a, f), rows in result.trials.items() for r in rows])
    atomic_write_text(path, frame.to_csv(index=False))
