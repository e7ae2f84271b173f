"""Equal-budget tuning: every arm tuned with the same budget, then compared tuned-for-tuned over folds.

On each test fold, for each arm:
  1. search   one Optuna (TPE) + ASHA sweep (`comic.tuning.sweep`) over the arm's own search space (declared with its
              method in the registry, `comic.methods.search_space`), objective val/map; every arm gets the same
              budget: `trials` trials of at most `epochs` epochs, the same ASHA rungs and the same sampler seed
              (checked: `check_equal_budgets`);
  2. confirm  the top-k configurations by val/map rerun over the seeds at full length, beside the arm's default
              configuration (study cells, `comic.studies.runner`: content-addressed, so cells another study already
              ran are read, not rerun);
  3. select   the tuned arm = the confirmed configuration with the best mean val/map over seeds (`select`).
Selection reads validation metrics only, and on fold f the sweep and the confirmation train and validate on the
other folds' images: the test photos of the fold a result is reported on never choose anything.

State: `<study dir>/sweeps/` (Tune experiments and each finished sweep's trial table, `<name>.trials.json`: a rerun
reads it and runs no trial), the cells of the confirmation in `<study dir>/` as every study's, and the parent run id
in `tuned.json`. MLflow: one parent run per study; each (arm, fold) sweep a child with its trials beneath, and the
confirmation's plan run a child with its cells beneath.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from comic._io import UserError, atomic_write_text
from comic.config import Config, apply_overrides
from comic.engine import BestTestScores
from comic.studies.plan import Study
from comic.studies.runner import FINISHED, StudyRun
from comic.tracking.client import RunTracker
from comic.tracking.provenance import command_line, run_tags
from comic.tracking.store import NOTE_TAG, resolve_tracking_uri
from comic.tuning.cluster import Resources
from comic.tuning.space import Dimension, method_space
from comic.tuning.sweep import SweepSpec, run_sweep

log = logging.getLogger(__name__)

SELECT_METRIC = "best/val/map"  # the confirmation's choice: validation only
SWEEP_METRIC = "val/map"  # a sweep trial's rank: its best validation mAP
STATE_FILE = "tuned.json"


@dataclass(frozen=True)
class TunedArm:
    """One row of the comparison: `overrides` of the base config (its method and switches); `drop`: keys of the
    method's space this arm switches off (COMIC -HTB has no alpha or lambda_b to tune)."""

    name: str
    overrides: Mapping[str, Any]
    drop: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


CEILING = "BCE (full labels)"
ARMS: tuple[TunedArm, ...] = (
    TunedArm("COMIC", {"method": "comic"}),
    TunedArm("-HTB", {"method": "comic", "htb.enabled": False}, ("htb.alpha", "loss.lambda_b")),
    TunedArm("BCE", {"method": "bce"}),
    TunedArm("ASL", {"method": "asl"}),
    TunedArm("DB", {"method": "db"}),
    TunedArm("Pseudo-Label", {"method": "pseudo-label"}),
    TunedArm("SPLC", {"method": "splc"}),
    TunedArm("Hill", {"method": "hill"}),
    TunedArm(CEILING, {"method": "bce", "data.missing_rate": 0.0}),
)


@dataclass(frozen=True)
class Budget:
    """What every arm gets: `trials` sweep trials of at most `epochs` epochs (ASHA: grace period, reduction
    factor), then its `top_k` configurations confirmed over `seeds` at `epochs` epochs."""

    trials: int
    epochs: int
    grace_period: int = 5
    reduction_factor: int = 2
    top_k: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)
    sampler_seed: int = 0

    def check(self) -> None:
        if self.trials < 1 or self.epochs < 1 or self.top_k < 1 or self.top_k > self.trials:
            raise UserError(f"budget: trials {self.trials}, epochs {self.epochs}, top-k {self.top_k}: need trials, "
                            "epochs >= 1 and 1 <= top-k <= trials (--trials, --top-k, train.epochs)")


@dataclass
class TunedStudy:
    """The whole study: `arms` on `folds` test folds (0: the benchmark's own test set) of `base`, one `budget`."""

    name: str
    base: Config
    budget: Budget
    study_dir: Path
    arms: Sequence[TunedArm] = ARMS
    folds: int = 3
    tracking_uri: str | None = None
    experiment: str = ""
    resources: Resources = field(default_factory=lambda: Resources(1, 0, 0))
    label: str = ""

    def __post_init__(self) -> None:
        self.budget.check()
        self.study_dir = Path(self.study_dir).expanduser().resolve()
        self.tracking_uri = resolve_tracking_uri(self.tracking_uri)
        self.experiment = self.experiment or self.name
        self.base = apply_overrides(self.base, {"train.epochs": self.budget.epochs})

    def fold_ids(self) -> list[int]:
        return list(range(self.folds)) if self.folds else [0]

    def fold_overrides(self, fold: int) -> dict[str, int]:
        return {"data.folds": self.folds, "data.fold": fold} if self.folds else {}

    def arm_base(self, arm: TunedArm, fold: int) -> Config:
        return apply_overrides(self.base, {**arm.overrides, **self.fold_overrides(fold)})

    def space(self, arm: TunedArm) -> dict[str, Dimension]:
        """The arm's own search space: its method's, less the keys the arm switches off."""
        full = method_space(apply_overrides(self.base, dict(arm.overrides)))
        return {k: d for k, d in full.items() if k not in arm.drop}

    def sweep_spec(self, arm: TunedArm, fold: int, parent_run_id: str = "") -> SweepSpec:
        b = self.budget
        return SweepSpec(base=self.arm_base(arm, fold), space=self.space(arm), num_samples=b.trials,
                         seed=b.sampler_seed, grace_period=min(b.grace_period, b.epochs),
                         reduction_factor=b.reduction_factor, resources=self.resources,
                         storage_path=str(self.study_dir / "sweeps"), name=f"{arm.slug}-fold{fold}",
                         tracking_uri=self.tracking_uri, experiment=self.experiment, nested_under=parent_run_id)


def check_equal_budgets(specs: Sequence[SweepSpec]) -> tuple[int, int]:
    """Every sweep's (trials, max epochs, ASHA rungs, sampler seed) must be the same; returns (trials, epochs)."""
    budgets = {(s.num_samples, s.base.train.epochs, s.grace_period, s.reduction_factor, s.seed) for s in specs}
    if len(budgets) != 1:
        raise AssertionError(f"unequal tuning budgets across arms: {sorted(budgets)}")
    trials, epochs, *_ = next(iter(budgets))
    return trials, epochs


# ------------------------------------------------------------------------------------------------- running


@dataclass
class TunedResult:
    """What ran (`trials_run`, `cells_run`: 0 on an identical rerun) and what came out: each sweep's trials, the
    confirmation's cells, and which confirmed rank each (arm, fold) selected."""

    trials: dict[tuple[str, int], list[dict[str, Any]]]
    cells: pd.DataFrame
    chosen: dict[tuple[str, int], int]
    trials_run: int
    cells_run: int
    parent_run_id: str
    budget: tuple[int, int]
    scores: dict[str, BestTestScores]  # cell key -> its per-image test scores (the bootstrap's input)


def run_study(study: TunedStudy, backend: str = "ray") -> TunedResult:
    """Search, confirm and select (see the module docstring); idempotent."""
    specs = {(a.name, f): study.sweep_spec(a, f) for a in study.arms for f in study.fold_ids()}
    budget = check_equal_budgets(list(specs.values()))
    with _parent(study) as parent:
        _save_parent(study, parent.run_id)
        trials, ran = {}, 0
        for (arm, fold), spec in specs.items():
            trials[(arm, fold)], new = _sweep(replace(spec, nested_under=parent.run_id), study.study_dir)
            ran += new
            if len(trials[(arm, fold)]) != budget[0]:
                raise AssertionError(f"sweep {spec.name}: {len(trials[(arm, fold)])} trials, the budget is {budget[0]}")
        confirm = confirmation(study, trials)
        run = StudyRun(confirm, study.base, study_dir=study.study_dir, tracking_uri=study.tracking_uri,
                       experiment=study.experiment, title=f"tuned study {study.name}: confirmation",
                       label=study.label, parent_run_id=parent.run_id)
        with run:
            todo = len(run.pending())
            rows = run.run(backend, resources=study.resources, progress=study.base.engine.progress)
    chosen = select(rows, study)
    return TunedResult(trials, rows, chosen, ran, todo, parent.run_id, budget, run.test_scores())


def _parent(study: TunedStudy) -> RunTracker:
    """The study's parent run: reattached from `tuned.json` on a rerun."""
    path = study.study_dir / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    note = (f"Equal-budget tuning `{study.name}`: arms {', '.join(a.name for a in study.arms)}; {study.budget.trials} "
            f"trials x {study.budget.epochs} epochs per arm and fold; top {study.budget.top_k} confirmed over seeds "
            f"{list(study.budget.seeds)}. Made by: `{command_line()}`")
    return RunTracker(study.tracking_uri, study.experiment, run_name=f"{study.name} · {study.label}".strip(" ·"),
                      run_id=state.get("parent_run_id"), tags=run_tags({NOTE_TAG: note, "tuned.study": study.name}))


def _save_parent(study: TunedStudy, run_id: str) -> None:
    study.study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(study.study_dir / STATE_FILE, json.dumps({"parent_run_id": run_id,
                                                               "tracking_uri": study.tracking_uri}))


def _sweep(spec: SweepSpec, study_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """(the sweep's trial rows, trials run now): read from `<name>.trials.json` when the sweep finished before."""
    table = study_dir / "sweeps" / f"{spec.name}.trials.json"
    if table.is_file():
        return json.loads(table.read_text()), 0
    resume = (Path(spec.path) / "comic_sweep.json").is_file()  # interrupted before: continue it
    result = run_sweep(spec, resume=resume)
    rows = [{k: v for k, v in r.items() if _plain(v)} for r in result.trials]
    atomic_write_text(table, json.dumps(rows, default=str))
    return rows, len(rows)


def _plain(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def top_configs(rows: Sequence[Mapping[str, Any]], space: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The k best trials' configurations by val/map (errored and unscored trials left out; fewer when fewer
    scored). Test metrics are never read."""
    scored = [r for r in rows if r.get("state") != "errored" and _finite(r.get(SWEEP_METRIC))]
    ranked = sorted(scored, key=lambda r: -float(r[SWEEP_METRIC]))[:k]
    return [{key: r[key] for key in space} for r in ranked]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def confirmation(study: TunedStudy, trials: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]]) -> Study:
    """The confirmation grid: per arm its default and `top<r>` variants (r = 1..k); `top<r>` takes, on each fold,
    the r-th best configuration of that fold's own sweep (the best one again when the sweep scored fewer)."""
    variants: dict[str, Mapping[str, Any]] = {}
    per_fold: dict[tuple[str, int], dict[str, Any]] = {}
    for arm in study.arms:
        variants[default_name(arm.name)] = dict(arm.overrides)
        for fold in study.fold_ids():
            tops = top_configs(trials[(arm.name, fold)], list(study.space(arm)), study.budget.top_k)
            for rank in range(1, study.budget.top_k + 1):
                variants[top_name(arm.name, rank)] = dict(arm.overrides)
                if tops:
                    per_fold[(top_name(arm.name, rank), fold)] = tops[min(rank, len(tops)) - 1]
    return Study(study.name, variants, tuple(study.budget.seeds), folds=study.folds, per_fold=per_fold)


def default_name(arm: str) -> str:
    return f"{arm} default"


def top_name(arm: str, rank: int) -> str:
    return f"{arm} top{rank}"


def select(rows: pd.DataFrame, study: TunedStudy) -> dict[tuple[str, int], int]:
    """(arm, fold) -> the confirmed rank with the best mean validation mAP over seeds (SELECT_METRIC only)."""
    done = rows[rows["state"] == FINISHED]
    chosen = {}
    for arm in study.arms:
        for fold in study.fold_ids():
            means = {rank: done[(done["arm"] == top_name(arm.name, rank)) & (done["fold"] == fold)][SELECT_METRIC]
                     .mean() for rank in range(1, study.budget.top_k + 1)}
            scored = {r: m for r, m in means.items() if _finite(m)}
            if scored:
                chosen[(arm.name, fold)] = max(scored, key=lambda r: (scored[r], -r))
    return chosen
