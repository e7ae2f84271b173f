"""Ablation grids: arms and references, content-addressed cells, interruption and resume, the loss arms, and every
ablation script's --smoke-test (in-process, local backend)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from comic.checkpoint import load_best
from comic.config import ConfigError, apply_overrides, load_config
from comic.metrics import evaluate_scores
from comic.report.stats import aggregate
from comic.studies import cli, runner
from comic.studies.plan import Study, cell_key, plan
from comic.studies.runner import FAILED, FINISHED, PENDING, StudyRun
from comic.tracking.run import tracked_fit
from comic.tuning.cluster import Resources

mlflow = pytest.importorskip("mlflow")
REPO = Path(__file__).resolve().parents[2]
ABLATIONS = REPO / "ablations"
SCRIPTS = tuple(sorted(p.stem for p in ABLATIONS.glob("*.py")))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"ablation_script_{name}", ABLATIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------- the grid


def test_arms_names_and_references():
    grid = Study("g", {"full": {}, "no_rlc": {"rlc.enabled": False}}, (0, 1),
                 {"r0": {"data.missing_rate": 0.0}, "r4": {"data.missing_rate": 0.4}}, reference="full")
    assert [a.name for a in grid.arms()] == ["r0 / full", "r0 / no_rlc", "r4 / full", "r4 / no_rlc"]
    assert grid.references() == {"r0 / full": None, "r0 / no_rlc": "r0 / full", "r4 / full": None,
                                 "r4 / no_rlc": "r4 / full"}
    assert grid.arms()[1].overrides == {"data.missing_rate": 0.0, "rlc.enabled": False}
    rates = Study("m", {"COMIC": {}}, (0,), {"0%": {"data.missing_rate": 0.0}, "40%": {}}, reference="40%")
    assert rates.references() == {"0%": "40%", "40%": None}
    assert Study("v", {"a": {}, "b": {}}, (0,)).references() == {"a": None, "b": "a"}
    assert Study("one", {"a": {}}, (0,), reference="a").references() == {"a": None}


@pytest.mark.parametrize("kwargs, message", [
    ({"seeds": (0, 0)}, "distinct"),
    ({"seeds": ()}, "distinct"),
    ({"reference": "nope"}, "reference='nope'"),
    ({"benchmarks": {"x": {"rlc.tau": 0.5}}}, "only set data"),
])
def test_study_validation(kwargs, message):
    args = {"name": "s", "variants": {"a": {}, "b": {}}, "seeds": (0, 1)} | kwargs
    with pytest.raises(ConfigError, match=message):
        Study(**args)


def test_cell_key_ignores_where_and_how_verbosely(smoke_overrides):
    cfg = load_config("synthetic", smoke_overrides)
    key = cell_key(cfg, "data1", "code1")
    same = apply_overrides(cfg, {"engine.progress": True, "engine.threads": 1, "data.cache_dir": "/else",
                                 "data.num_workers": 4, "train.log_interval": 7})
    assert cell_key(same, "data1", "code1") == key
    for other in (apply_overrides(cfg, {"seed": 1}), apply_overrides(cfg, {"rlc.tau": 0.8})):
        assert cell_key(other, "data1", "code1") != key
    assert cell_key(cfg, "data2", "code1") != key and cell_key(cfg, "data1", "code2") != key


def test_plan_shares_identical_cells_and_reports_bad_overrides(smoke_overrides):
    base = load_config("synthetic", smoke_overrides)
    study = Study("share", {"a=2": {"htb.alpha": 2.0}, "default": {}, "tau": {"rlc.tau": 0.6}}, (0, 1))
    cells = plan(study, base, code="c")
    keys = [c.key for c in cells]
    assert keys[0:2] == keys[2:4] and len(set(keys)) == 4  # htb.alpha=2 is the default: one cell per seed
    with pytest.raises(ConfigError, match="arm 'bad'.*did you mean 'rlc.tau'"):
        plan(Study("bad", {"bad": {"rlc.tua": 0.5}}, (0,)), base, code="c")


# --------------------------------------------------------------------------------------------- interruption


class Stop(Exception):
    """Raised from the progress callback: the grid stops as if the driver had died after that cell."""


def test_interrupted_grid_reruns_only_missing_cells(smoke_overrides, tmp_path, monkeypatch, restore_torch_globals,
                                                    crash_after):
    base = load_config("synthetic", smoke_overrides | {"engine.deterministic": True, "engine.threads": 1})
    study = Study("interrupt", {"COMIC": {}, "-RLC": {"rlc.enabled": False}}, (0, 1), reference="COMIC")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    calls: list[tuple[str, int]] = []

    def counting_fit(cfg, **kwargs):
        cell = (kwargs["tags"]["ablation.arm"], cfg.seed)
        calls.append(cell)
        if cell == ("COMIC", 1) and "resumed" in str(kwargs["workdir"]) and calls.count(cell) == 1:
            # Crash after epoch 1 (its checkpoint written); the rerun of the cell resumes and does not crash again.
            kwargs["report"] = crash_after(1)
        return tracked_fit(cfg, **kwargs)

    monkeypatch.setattr(runner, "tracked_fit", counting_fit)

    def stop_after_three(cell, row):
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop), StudyRun(study, base, study_dir=tmp_path / "resumed", tracking_uri=uri) as first:
        first.run(on_cell=stop_after_three, progress=False)
    assert calls == [("COMIC", 0), ("COMIC", 1), ("-RLC", 0)]
    rows = first.rows()
    states = {(a, s): state for a, s, state in zip(rows["arm"], rows["seed"], rows["state"], strict=True)}
    assert states == {("COMIC", 0): FINISHED, ("COMIC", 1): FAILED, ("-RLC", 0): FINISHED, ("-RLC", 1): PENDING}
    crashed_run = rows.set_index(["arm", "seed"]).loc[("COMIC", 1), "run_id"]

    calls.clear()
    with StudyRun(study, base, study_dir=tmp_path / "resumed", tracking_uri=uri) as second:
        resumed = second.run(progress=False)
    assert calls == [("COMIC", 1), ("-RLC", 1)]  # only the failed and the never-run cell
    assert set(resumed["state"]) == {FINISHED}
    assert second.parent.run_id == first.parent.run_id  # same plan: the same parent run

    client = mlflow.MlflowClient(uri)
    crashed = client.get_run(crashed_run)
    assert crashed.info.status == "FINISHED" and crashed.data.tags["resume_count"] == "1"  # resumed, same run
    assert [m.step for m in client.get_metric_history(crashed_run, "val/map")] == [1, 2]
    children = client.search_runs([second.experiment_id], f"tags.mlflow.parentRunId = '{second.parent.run_id}'")
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}

    calls.clear()
    with StudyRun(study, base, study_dir=tmp_path / "clean", tracking_uri=uri) as clean_run:
        clean = clean_run.run(progress=False)
    assert len(calls) == 4
    columns = {"total": "best/test/map", "few": "best/test/map_few", "recall": "best/test/recall"}
    table = [aggregate(rows, columns, study.references(), ["COMIC", "-RLC"]) for rows in (resumed, clean)]
    pd.testing.assert_frame_equal(table[0], table[1])
    assert resumed["best/test/map"].tolist() == clean["best/test/map"].tolist()
    for key, epoch, test_map in zip(clean["key"], clean["best/epoch"], clean["best/test/map"], strict=True):
        best = load_best(tmp_path / "clean" / "cells" / key)  # every cell keeps its best-on-val weights
        assert best["epoch"] == epoch and best["metrics"]["best/test/map"] == test_map
    curves = second.curves().sort_values(["key", "metric", "epoch"]).reset_index(drop=True)
    assert len(curves) and curves.equals(clean_run.curves().sort_values(["key", "metric", "epoch"])
                                         .reset_index(drop=True))


# --------------------------------------------------------------------------------------------- backends


def test_ray_backend_glue_with_a_stand_in_for_run_configs(smoke_overrides, tmp_path, monkeypatch):
    """CONTRACT TEST, no Ray: `run_configs` is replaced by a sequential stand-in that honours its contract
    (child runs of the parent with the given names and tags; final metrics in input order, {} for a failed cell).
    It checks the ray branch's glue: run ids found by tag, curves read back from MLflow, failures recorded.
    The real Ray path is `test_ray_backend_end_to_end`."""
    def fake_run_configs(configs, *, names, storage_path, name, log_to, resources, max_failures=1, resume=False,
                         tags=None, shared_storage=False, log_models=False):
        tracking_uri, experiment, parent_run_id = log_to.tracking_uri, log_to.experiment, log_to.parent_run_id
        assert resume and name.startswith("rayglue-") and storage_path.endswith("ray") and not log_models
        out = []
        for i, (cfg, run_name) in enumerate(zip(configs, names, strict=True)):
            if cfg.rlc.enabled is False and cfg.seed == 1:  # a trial that errors for good, its run FAILED
                broken = apply_overrides(cfg, {"method": "ml-gcn", "model.label_embeddings": ""})
                with pytest.raises(ValueError, match="needs model.label_embeddings"):
                    tracked_fit(broken, tracking_uri=tracking_uri, experiment=experiment, workdir=tmp_path / "bad",
                                run_name=run_name, parent_run_id=parent_run_id, tags=tags[i])
                out.append({})
                continue
            result, _ = tracked_fit(cfg, tracking_uri=tracking_uri, experiment=experiment,
                                    workdir=tmp_path / "trials" / str(i), run_name=run_name,
                                    parent_run_id=parent_run_id, tags=tags[i])
            out.append(result.metrics)
        return out

    monkeypatch.setattr(runner, "run_configs", fake_run_configs)
    base = load_config("synthetic", smoke_overrides | {"train.epochs": 1})
    study = Study("rayglue", {"COMIC": {}, "-RLC": {"rlc.enabled": False}}, (0, 1))
    with StudyRun(study, base, study_dir=tmp_path / "study", tracking_uri=f"sqlite:///{tmp_path}/m.db") as run:
        start = time.perf_counter()
        rows = run.run("ray")
        elapsed = time.perf_counter() - start
        curves = run.curves()
    finished = rows[rows["state"] == FINISHED]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    for row in finished.to_dict("records"):  # each cell's own wall time (its run's start to end), not the grid's
        info = client.get_run(row["run_id"]).info
        assert row["wall_s"] == pytest.approx((info.end_time - info.start_time) / 1000)
    assert finished["wall_s"].sum() < elapsed
    failed = rows[rows["state"] == FAILED]
    assert len(finished) == 3 and failed[["arm", "seed"]].values.tolist() == [["-RLC", 1]]
    assert failed["error"].iloc[0].startswith("ValueError: method ml-gcn needs model.label_embeddings")  # its own error
    assert all(len(r) == 32 for r in finished["run_id"]) and finished["run_id"].is_unique
    assert set(curves["metric"]) >= {"best/test/map", "val/map"} and len(curves) >= 3 * 2


@pytest.mark.ray
@pytest.mark.slow
def test_ray_backend_end_to_end(ray_local, smoke_overrides, tmp_path):
    """The ray backend through the real `run_configs` on the session's local Ray instance; with `log_models` every
    cell's run holds its model, and the parent names the benchmark."""
    base = load_config("synthetic", smoke_overrides | {"train.epochs": 1})
    study = Study("raygrid", {"COMIC": {}, "-HTB": {"htb.enabled": False}}, (0,))
    with StudyRun(study, base, study_dir=tmp_path / "study", tracking_uri=f"sqlite:///{tmp_path}/m.db",
                  log_models=True) as run:
        rows = run.run("ray", resources=Resources(cpus_per_trial=1))
        assert run.pending() == []
    assert rows["state"].tolist() == [FINISHED, FINISHED], rows[["state", "error"]]
    assert rows["run_id"].str.len().tolist() == [32, 32] and rows["best/test/map"].notna().all()
    assert set(run.curves()["arm"]) == {"COMIC", "-HTB"}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    child = client.get_run(rows["run_id"].iloc[0])
    assert child.data.tags["mlflow.parentRunId"] == run.parent.run_id and child.info.status == "FINISHED"
    assert all(client.get_run(r).data.tags["model_uri"].startswith("models:/m-") for r in rows["run_id"])
    parent_data = client.get_run(run.parent.run_id).inputs.dataset_inputs
    assert [d.dataset.name for d in parent_data] == [child.inputs.dataset_inputs[0].dataset.name]
    # A Ray trial's work directory is gone: its per-image test scores come from its MLflow run, and give back the
    # test mAP it logged.
    scores = run.test_scores()
    assert sorted(scores) == sorted(rows["key"]) and all((run.dir / "scores" / f"{k}.npz").is_file() for k in scores)
    for key, logged in zip(rows["key"], rows["best/test/map"], strict=True):
        kept = scores[key]
        assert evaluate_scores(kept.scores, kept.targets, kept.train_counts)["map"] == logged


# --------------------------------------------------------------------------------------------- the loss arms


def _reference_losses(z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Textbook formulas, summed: BCE, focal (gamma 2, no alpha), ASL (gamma- 4, gamma+ 0, margin 0.05)."""
    p = torch.sigmoid(z)
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    focal = -(y * (1 - p) ** 2 * torch.log(p) + (1 - y) * p**2 * torch.log(1 - p))
    p_m = (p - 0.05).clamp_min(0)
    asl = -(y * torch.log(p) + (1 - y) * p_m**4 * torch.log(1 - p_m))
    return {"BCE": bce.sum(), "Focal": focal.sum(), "ASL": asl.sum()}


def test_loss_arms_are_the_textbook_losses():
    from comic.losses.mfm import MFMLoss

    variants = _script("losses").SPEC.variants
    torch.manual_seed(0)
    z = torch.randn(16, 6, dtype=torch.float64) * 3
    y = (torch.rand(16, 6) < 0.3).double()
    counts = torch.tensor([500.0, 120, 60, 20, 5, 1])
    expected = _reference_losses(z, y)
    for name in ("BCE", "Focal", "ASL"):
        cfg = apply_overrides(load_config("synthetic"), variants[name])
        assert MFMLoss.from_config(cfg.mfm, counts)(z, y).item() == pytest.approx(expected[name].item(), rel=1e-9)
    assert variants["MFM"] == {}


# --------------------------------------------------------------------------------------------- the scripts


@pytest.fixture(scope="module")
def scripts_tracking(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('ablation_mlflow')}/mlflow.db"


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_smoke(name, smoke_overrides, scripts_tracking, tmp_path, capsys, restore_torch_globals):
    module = _script(name)
    # One torch thread: tiny models gain nothing from two, and two threads crawl when the CPUs are shared.
    argv = ["--smoke-test", "--study-dir", str(tmp_path / "study"), "--tracking-uri", scripts_tracking,
            f"data.cache_dir={smoke_overrides['data.cache_dir']}", "engine.progress=false", "engine.threads=1"]
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    spec = module.SPEC
    assert f"== {spec.title} ==" in out and "OURS" in out
    assert ("NOT produced by this run" in out) == (spec.paper is not None)  # the paper's table, where it has one
    assert "within noise" in out or "real" in out
    report = tmp_path / "study" / "report"
    for file in ("report.md", "table.md", "table.tex", "table.csv", "stats.csv", "cells.csv"):
        assert (report / file).is_file(), file
    assert (report / f"{name}.png").is_file()  # every study draws a figure (bars by default)
    assert "CAUTION: 2 seed(s)" in out  # the smoke test's two seeds say little
    cells = pd.read_csv(report / "cells.csv")
    assert set(cells["state"]) == {"finished"} and cells["seed"].nunique() == 2
    assert cells["run_id"].str.len().eq(32).all()
    client = mlflow.MlflowClient(scripts_tracking)
    parent = client.get_run(client.get_run(cells["run_id"].iloc[0]).data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == f"{spec.name} · smoke-test ({len(cells)} cells)"  # execution keys are not shown
    note = client.get_experiment(parent.info.experiment_id).tags["mlflow.note.content"]
    assert "<" not in re.sub(r"`[^`]*`", "", note)  # MLflow renders it as Markdown: a bare <arm> would vanish
    table = pd.read_csv(report / "table.csv")  # the table in numbers; table.md holds the strings
    assert table.columns.tolist() == ["arm", "metric", "mean", "std", "n", "ci_low", "ci_high"]
    assert {c: str(table[c].dtype) for c in ("mean", "std", "ci_low", "ci_high")} == dict.fromkeys(
        ("mean", "std", "ci_low", "ci_high"), "float64")
    assert table["arm"].drop_duplicates().tolist() == cells["arm"].drop_duplicates().tolist()
    assert table["metric"].drop_duplicates().tolist() == list(spec.columns)
    stats = pd.read_csv(report / "stats.csv")
    first = stats[stats["metric"] == next(iter(spec.columns))]
    assert first["mean"].notna().all() and (first["n"] == 2).all()  # total mAP of every arm over both seeds
    assert (report / "gap.csv").is_file() == (spec.gap is not None)
    if spec.gap is not None:  # the floor closes 0 % of its own gap, the ceiling 100 %
        gap = pd.read_csv(report / "gap.csv").set_index(["metric", "arm"])
        label = "total"  # the smoke data has no many-shot class
        assert gap.loc[(label, spec.gap[0]), "mean"] == pytest.approx(0.0)
        assert gap.loc[(label, spec.gap[1]), "mean"] == pytest.approx(100.0)
        assert "% of the gap closed" in out
    if spec.also_against is not None:  # every arm paired with the second arm too, worked from the cells here
        assert f"OURS - paired differences against {spec.also_against}:" in out
        second = pd.read_csv(report / "stats_also_against.csv")
        column = next(iter(spec.columns.values()))
        by_seed = cells.pivot(index="seed", columns="arm", values=column)
        for arm in by_seed.columns.drop(spec.also_against):
            row = second[(second["arm"] == arm) & (second["key"] == column)].iloc[0]
            assert row["reference"] == spec.also_against
            assert row["diff"] == pytest.approx((by_seed[arm] - by_seed[spec.also_against]).mean())


def test_plan_label_names_the_preset_and_the_overrides_that_change_results():
    """Two plans of one study in one experiment (split seeds 0 and 1) get parent runs the runs table tells apart."""
    module = _script("components")
    parser = cli.build_parser(module.SPEC, "doc")
    args = cli.parse(parser, ["--preset", "voc2007-dev-lt", "--seeds", "0", "1", "--", "data.split_seed=1",
                              "engine.threads=1", "model.label_embeddings=/data/vectors/glove_voc20_300d.npy"])
    assert cli.plan_label(args) == "voc2007-dev-lt data.split_seed=1 model.label_embeddings=glove_voc20_300d.npy"
    assert cli.plan_label(cli.parse(parser, ["--smoke-test", "data.cache_dir=/tmp/x"])) == "smoke-test"


def test_script_rerun_skips_finished_cells_and_rejects_bad_input(smoke_overrides, scripts_tracking, tmp_path,
                                                                  capsys):
    module = _script("distribution")
    argv = ["--smoke-test", "--seeds", "0", "--study-dir", str(tmp_path / "s"), "--tracking-uri", scripts_tracking,
            f"data.cache_dir={smoke_overrides['data.cache_dir']}", "engine.progress=false", "--epochs", "1"]
    assert module.main(argv) == 0
    assert "2 run now" in capsys.readouterr().out
    assert module.main(argv) == 0
    assert "0 run now (backend local), 2 reused" in capsys.readouterr().out
    assert module.main([*argv, "--dry-run"]) == 0
    assert "to run: 0" in capsys.readouterr().out
    assert module.main([*argv, "rlc.tua=0.5"]) == 2
    assert "did you mean 'rlc.tau'" in capsys.readouterr().err
    # a subset of arms: the reference always runs; an unknown arm is named with the ones there are
    assert module.main([*argv, "--arm", "static", "--dry-run"]) == 0
    assert "2 cells" in capsys.readouterr().out
    assert _script("components").main([*argv, "--arm=-HTB", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "-HTB" in plan and "COMIC" in plan and "-RLC" not in plan
    assert module.main([*argv, "--arm", "stat"]) == 2
    assert "no arm 'stat' in this study; its arms are 'static', 'dynamic'" in capsys.readouterr().err


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", *args],
                   check=True, capture_output=True)


def test_rerun_after_execution_changes_and_a_readme_commit_reuses_every_cell(tmp_path):
    """A smoke grid in a git checkout of the project; then the cache moved, other workers and log interval, and a
    README commit: every cell is reused, none runs. The code version behind the cell keys ignores README and
    orchestration edits and changes with an edit of a computing module."""
    repo = tmp_path / "repo"
    for folder in ("comic", "ablations"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "README.md").write_text("# COMIC Lab\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "first")
    env = os.environ | {"PYTHONPATH": str(repo)}
    common = [sys.executable, str(repo / "ablations" / "distribution.py"), "--smoke-test", "--seeds", "0",
              "--epochs", "1", "--study-dir", str(tmp_path / "study"), "--tracking-uri",
              f"sqlite:///{tmp_path}/mlflow.db", "engine.progress=false", "engine.threads=1"]

    def run(*args: str) -> str:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def code() -> str:
        return run(sys.executable, "-c", "from comic.tracking.provenance import code_version; print(code_version())")

    first = code()
    assert "2 run now" in run(*common, f"data.cache_dir={tmp_path / 'cache'}")
    shutil.move(tmp_path / "cache", tmp_path / "moved")  # the data cache moved to another disk
    (repo / "README.md").write_text("# COMIC Lab\n\nA new paragraph.\n")
    _git(repo, "commit", "-qam", "README")
    again = run(*common, f"data.cache_dir={tmp_path / 'moved'}", "data.num_workers=1", "train.log_interval=3")
    assert "0 run now (backend local), 2 reused" in again
    for edited, computing in (("comic/tuning/sweep.py", False), ("comic/losses/mfm.py", True)):
        with (repo / edited).open("a") as fh:
            fh.write("\n# an edit\n")
        assert (code() != first) == computing, edited
