"""The equal-budget tuned study: every arm's space from the registry, budgets asserted equal, selection by validation
only, and the one-command smoke study (sweeps nested under one MLflow parent; a rerun runs 0 trials and 0 cells)."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from comic.config import load_config
from comic.methods import search_space
from comic.studies.tuned import ARMS, Budget, TunedStudy, check_equal_budgets, select, top_configs

mlflow = pytest.importorskip("mlflow")
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _study(tmp_path, **changes) -> TunedStudy:
    fields = {"name": "t", "base": load_config("synthetic"), "budget": Budget(trials=4, epochs=6, top_k=2),
              "study_dir": tmp_path, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return TunedStudy(**(fields | changes))


@pytest.mark.parametrize("arm", ARMS, ids=lambda a: a.name)
def test_every_arm_searches_its_methods_registry_space(arm, tmp_path):
    study = _study(tmp_path)
    space = study.space(arm)
    declared = set(search_space(arm.overrides["method"]))
    assert set(space) == declared - set(arm.drop) and not set(arm.drop) - declared  # a dropped key exists
    spec = study.sweep_spec(arm, fold=1)
    assert (spec.base.data.folds, spec.base.data.fold, spec.base.method) == (3, 1, arm.overrides["method"])
    assert (spec.num_samples, spec.base.train.epochs) == (4, 6)


def test_unequal_budgets_are_refused(tmp_path):
    study = _study(tmp_path)
    specs = [study.sweep_spec(a, 0) for a in ARMS[:3]]
    assert check_equal_budgets(specs) == (4, 6)
    with pytest.raises(AssertionError, match="unequal tuning budgets"):
        check_equal_budgets([*specs, replace(specs[0], num_samples=5)])
    with pytest.raises(AssertionError, match="unequal tuning budgets"):
        check_equal_budgets([*specs, replace(specs[1], grace_period=1)])


def test_selection_reads_validation_metrics_only(tmp_path):
    study = _study(tmp_path, arms=ARMS[:1], folds=2)
    trials = [{"trial": f"t{i}", "state": "completed", "val/map": v, "test/map": t, "htb.alpha": float(i)}
              for i, (v, t) in enumerate([(50.0, 10.0), (60.0, 1.0), (55.0, 99.0), (float("nan"), 100.0)])]
    assert top_configs(trials, ["htb.alpha"], 2) == [{"htb.alpha": 1.0}, {"htb.alpha": 2.0}]
    cells = pd.DataFrame([{"arm": f"COMIC top{r}", "fold": f, "seed": s, "state": "finished",
                           "best/val/map": val + s, "best/test/map": test}
                          for f, ranks in enumerate([{1: (40.0, 90.0), 2: (45.0, 10.0)},
                                                     {1: (70.0, 10.0), 2: (65.0, 90.0)}])
                          for r, (val, test) in ranks.items() for s in (0, 1)])
    assert select(cells, study) == {("COMIC", 0): 2, ("COMIC", 1): 1}
    shuffled = cells.assign(**{"best/test/map": cells["best/test/map"].sample(frac=1, random_state=0).to_numpy()})
    assert select(shuffled, study) == select(cells, study)


def _script():
    spec = importlib.util.spec_from_file_location("experiments_tuned", EXPERIMENTS / "tuned.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_tuned_study_runs_equal_budgets_and_a_rerun_runs_nothing(smoke_overrides, tmp_path, capsys, ray_local,
                                                                       restore_torch_globals):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--smoke-test", "--arm", "BCE", "--study-dir", str(tmp_path / "study"), "--tracking-uri", uri,
            f"data.cache_dir={smoke_overrides['data.cache_dir']}", "engine.progress=false", "engine.threads=1"]
    module = _script()
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "**2 trials × ≤ 2 epochs** (equal for all arms, checked)" in out
    ran = re.search(r"This run: (\d+) sweep trials and (\d+) confirmation cells executed", out)
    # 2 arms x 2 folds x 2 trials; cells: (default, top1) x 2 folds x 2 arms, fewer where top1 is the default point
    assert ran and int(ran[1]) == 8 and 4 <= int(ran[2]) <= 8
    assert "Δ from tuning" in out and "BCE tuned" in out and "Spearman" in out
    trials = pd.read_csv(tmp_path / "study" / "report" / "trials.csv")
    assert trials.groupby(["arm", "fold"]).size().to_dict() == {(a, f): 2 for a in ("BCE", "COMIC") for f in (0, 1)}

    # MLflow: one study parent; each (arm, fold) sweep a child with its trials beneath; the confirmation a child.
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tuned-smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}
    top = [r for r in runs if parent_of[r.info.run_id] is None]
    assert len(top) == 1
    children = [r for r in runs if parent_of[r.info.run_id] == top[0].info.run_id]
    sweeps = sorted(r.info.run_name for r in children if "sweep.name" in r.data.tags)
    assert sweeps == ["bce-fold0", "bce-fold1", "comic-fold0", "comic-fold1"]
    for sweep in (r for r in children if "sweep.name" in r.data.tags):
        assert sum(parent_of[r.info.run_id] == sweep.info.run_id for r in runs) == 2  # its 2 trials
    assert len(children) == 5  # 4 sweeps + the confirmation's plan run

    assert module.main(argv) == 0
    assert "This run: 0 sweep trials and 0 confirmation cells executed" in capsys.readouterr().out
    assert len(client.search_runs([experiment.experiment_id], max_results=500)) == len(runs)
    assert re.search(r"BCE tuned .*\| COMIC tuned", (tmp_path / "study" / "report" / "tuned.md").read_text())
