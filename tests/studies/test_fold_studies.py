"""Studies over disjoint test folds (`--folds k`): cells = arms × folds × seeds, each run's per-image test scores
kept, per-fold tables and the pooled verdicts, the fold on every MLflow cell, and a rerun that runs nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from comic.engine import read_test_scores
from comic.metrics import evaluate_scores

mlflow = pytest.importorskip("mlflow")
ABLATIONS = Path(__file__).resolve().parents[2] / "ablations"


def _components():
    spec = importlib.util.spec_from_file_location("ablation_script_components_folds", ABLATIONS / "components.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_fold_smoke_study_writes_pooled_verdicts_and_reruns_nothing(smoke_overrides, tmp_path,
                                                                        capsys, restore_torch_globals):
    study_dir, scripts_tracking = tmp_path / "study", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--smoke-test", "--folds", "2", "--arm=-HTB", "--study-dir", str(study_dir), "--tracking-uri",
            scripts_tracking, f"data.cache_dir={smoke_overrides['data.cache_dir']}", "engine.progress=false",
            "engine.threads=1"]
    module = _components()
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 arms x 2 seeds [0, 1] x 2 test folds = 8 cells; 8 run now" in out
    assert "POOLED VERDICTS over 2 folds × 2 seeds × test images" in out
    assert "fold 0: paired differences by seed" in out and "fold 1: paired differences by seed" in out
    report = study_dir / "report"
    cells = pd.read_csv(report / "cells.csv")
    assert len(cells) == 8 and sorted(cells["fold"].unique()) == [0, 1] and set(cells["state"]) == {"finished"}

    # Every cell's kept scores give back exactly the test mAP its run logged.
    for row in cells.to_dict("records"):
        kept = read_test_scores(study_dir / "scores" / f"{row['key']}.npz")
        assert evaluate_scores(kept.scores, kept.targets, kept.train_counts)["map"] == row["best/test/map"]

    # The pooled point estimate is the mean over folds of the seed-mean differences of the logged metrics.
    verdicts = pd.read_csv(report / "verdicts.csv")
    pooled = verdicts[(verdicts["fold"] == "pooled") & (verdicts["metric"] == "total mAP")].iloc[0]
    by = cells.pivot_table(index=["fold", "seed"], columns="arm", values="best/test/map")
    expected = (by["-HTB"] - by["COMIC"]).groupby(level="fold").mean().mean()
    assert pooled["arm"] == "-HTB" and pooled["reference"] == "COMIC"
    assert pooled["diff"] == pytest.approx(expected, abs=1e-9)
    assert pooled["ci_low"] <= pooled["diff"] <= pooled["ci_high"]
    assert set(verdicts.loc[verdicts["fold"] == "pooled", "verdict"]) <= {"holds", "within noise", "mixed"}
    assert sorted(verdicts.loc[verdicts["fold"] != "pooled", "fold"].unique()) == ["0", "1"]

    # MLflow: one parent for the study, the fold as a tag on each cell.
    client = mlflow.MlflowClient(scripts_tracking)
    runs = [client.get_run(r) for r in cells["run_id"]]
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    assert sorted(r.data.tags["ablation.fold"] for r in runs) == ["0"] * 4 + ["1"] * 4
    assert all(any(a.path == "scores/test_scores.npz" for a in client.list_artifacts(r.info.run_id, "scores"))
               for r in runs)

    assert module.main(argv) == 0  # a rerun finds every cell finished
    assert "= 8 cells; 0 run now (backend local), 8 reused" in capsys.readouterr().out
