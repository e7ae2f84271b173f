"""A run's state on disk: only what changes is written, as often as the policy says, the best-on-val weights kept and
usable, and every interruption (a crash, SIGKILL, SIGTERM, Ctrl-C) resumed exactly from the last epoch on disk."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from comic.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointPolicy,
    RunCheckpoint,
    load_best,
    load_checkpoint,
)
from comic.config import load_config, to_dict
from comic.engine import fit, setup

EXACT = {"engine.deterministic": True, "engine.threads": 1}
VOLATILE = ("perf/",)


def _cfg(smoke_overrides, **extra):
    return load_config("synthetic", smoke_overrides | EXACT | extra)


def _same_metrics(a: dict, b: dict) -> None:
    for key, value in a.items():
        if not key.startswith(VOLATILE) and not (isinstance(value, float) and math.isnan(value)):
            assert b[key] == value, key


def test_the_policy_writes_by_time_at_chosen_epochs_and_at_the_end():
    every_minute = CheckpointPolicy(every_s=60.0, epochs=frozenset({2}))
    assert not every_minute.due(1, last=False, since_s=59.9)
    assert every_minute.due(1, last=False, since_s=60.0)
    assert every_minute.due(2, last=False, since_s=0.0)
    assert every_minute.due(7, last=True, since_s=0.0)
    assert all(CheckpointPolicy(every_s=0.0).due(e, last=False, since_s=0.0) for e in range(1, 5))


@pytest.mark.parametrize("profile", ["finetune", "released", "frozen"])
def test_best_weights_reproduce_the_runs_best_test_map(smoke_overrides, tmp_path, profile, evaluate_best):
    cfg = _cfg(smoke_overrides, **{"train.epochs": 3, "model.profile": profile})
    result = fit(cfg, workdir=tmp_path)
    best = load_best(tmp_path)
    assert best["epoch"] == result.metrics["best/epoch"]
    assert best["metrics"]["best/test/map"] == result.metrics["best/test/map"]
    assert evaluate_best(cfg, tmp_path)["test/map"] == result.metrics["best/test/map"]


def test_a_frozen_trunk_is_never_in_a_checkpoint(smoke_overrides, tmp_path):
    """Profile released (tiny trunk, frozen, train-mode BatchNorm): the trunk's parameters are in neither file, its
    BatchNorm statistics (which training changes) are; a resumed run re-creates the trunk and ends as an uninterrupted
    one."""
    cfg = _cfg(smoke_overrides, **{"train.epochs": 3, "model.profile": "released", "train.checkpoint_every_s": 0})
    clean = fit(cfg)
    with pytest.raises(RuntimeError, match="crash after epoch 2"):
        fit(cfg, report=_Crash(2), workdir=tmp_path)
    state = load_checkpoint(tmp_path / CHECKPOINT_DIR)
    trunk = setup(cfg).objects["model"].trunks.shared
    trunk_params = {f"trunks.shared.{name}" for name, _ in trunk.named_parameters()}
    assert trunk_params and set(state["frozen"]) == trunk_params
    for weights in (state["objects"]["model"], load_best(tmp_path)["model"]):
        assert not trunk_params & set(weights)
        assert any(k.startswith("trunks.shared.") and k.endswith("running_mean") for k in weights)
        assert any(k.startswith("balanced.features.") for k in weights)
    _same_metrics(clean.metrics, fit(cfg, workdir=tmp_path).metrics)


class _Crash:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, metrics: dict, run) -> None:
        if metrics["epoch"] == self.epoch:
            raise RuntimeError(f"crash after epoch {self.epoch}")


CHILD = """
import json, os, signal, sys
from comic.checkpoint import CheckpointPolicy
from comic.config import from_dict
from comic.engine import fit
cfg, workdir, kill_at, signum, saved = from_dict(json.loads(sys.argv[1])), sys.argv[2], *map(int, sys.argv[3:6])
def report(metrics, run):
    if metrics["epoch"] == kill_at:  # the signal lands once this epoch is finished and reported
        os.kill(os.getpid(), signum)
fit(cfg, report, workdir=workdir, policy=CheckpointPolicy(every_s=float("inf"), epochs=frozenset({saved})))
"""


def _train_and_signal(cfg, workdir, kill_at: int, signum: int, saved: int) -> int:
    """A real second process trains `cfg` (checkpoints at epoch `saved` and the last) and gets `signum` right after
    epoch `kill_at`; returns its exit status."""
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(to_dict(cfg)), str(workdir), str(kill_at),
                           str(int(signum)), str(saved)], capture_output=True, text=True, timeout=300)
    return done.returncode


@pytest.mark.parametrize(("signum", "resumed_from"), [(signal.SIGKILL, 2), (signal.SIGTERM, 4)])
def test_a_killed_run_resumes_from_its_last_epoch_on_disk(smoke_overrides, tmp_path, signum, resumed_from):
    """SIGKILL between two checkpoints (epoch 2 written, killed after 4): the run resumes from epoch 2. SIGTERM: the
    last finished epoch (4) is written on the way out, and the process still dies of SIGTERM. Either way the run ends
    with the metrics of an uninterrupted one."""
    cfg = _cfg(smoke_overrides, **{"train.epochs": 5, "model.profile": "frozen"})
    clean = fit(cfg)
    assert _train_and_signal(cfg, tmp_path, kill_at=4, signum=signum, saved=2) == -signum
    assert load_checkpoint(tmp_path / CHECKPOINT_DIR)["run"]["epoch"] == resumed_from
    seen = []
    resumed = fit(cfg, report=lambda metrics, run: seen.append(int(metrics["epoch"])), workdir=tmp_path)
    assert seen == list(range(resumed_from + 1, 6)) and len(resumed.history) == 5
    _same_metrics(clean.metrics, resumed.metrics)


def test_ctrl_c_writes_the_last_finished_epoch(smoke_overrides, tmp_path):
    """A real SIGINT right after epoch 2 (nothing written yet by the policy): KeyboardInterrupt, epoch 2 on disk, and
    the resumed run ends as an uninterrupted one."""
    cfg = _cfg(smoke_overrides, **{"train.epochs": 3, "model.profile": "frozen", "train.checkpoint_every_s": 1e9})

    def interrupt(metrics: dict, run) -> None:
        if metrics["epoch"] == 2:
            assert not run.saved
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(cfg, report=interrupt, workdir=tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert load_checkpoint(tmp_path / CHECKPOINT_DIR)["run"]["epoch"] == 2
    _same_metrics(fit(cfg).metrics, fit(cfg, workdir=tmp_path).metrics)


def test_few_checkpoints_are_written_and_a_finished_run_is_read_back(smoke_overrides, tmp_path, monkeypatch):
    """With the time policy, an 8-epoch run writes its state once (at the end); `finished` reads the progress of a
    finished run (its weights memory-mapped, not read)."""
    cfg = _cfg(smoke_overrides, **{"train.epochs": 8, "model.profile": "frozen", "train.checkpoint_every_s": 1e9})
    writes = []
    original = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: (writes.append(str(path)), original(obj, path)))
    result = fit(cfg, workdir=tmp_path)
    assert len([w for w in writes if "state.pt" in w]) == 1 and len([w for w in writes if "best.pt" in w]) == 1
    checkpoint = RunCheckpoint(cfg, tmp_path, setup(cfg).bench.digest)
    finished = checkpoint.finished(7)
    assert len(finished.history) == 8 and checkpoint.finished(9) is None
    _same_metrics(result.metrics, finished.history[-1])


def test_an_unconfirmed_best_file_is_settled_on_resume(smoke_overrides, tmp_path):
    """A crash after the best weights were written but before the state: `restore` keeps them only when the state on
    disk names their epoch."""
    cfg = _cfg(smoke_overrides, **{"train.epochs": 2, "model.profile": "frozen", "train.checkpoint_every_s": 0})
    fit(cfg, workdir=tmp_path)
    folder = tmp_path / CHECKPOINT_DIR
    best = load_best(tmp_path)
    torch.save(best | {"epoch": 99}, folder / "best.pt.next")  # a best the state never confirmed
    s = setup(cfg)
    RunCheckpoint(cfg, tmp_path, s.bench.digest).restore(s.objects)
    assert not (folder / "best.pt.next").exists() and load_best(tmp_path)["epoch"] == best["epoch"]
    torch.save(best | {"model": {}}, folder / "best.pt.next")  # the state names its epoch: it replaces best.pt
    RunCheckpoint(cfg, tmp_path, s.bench.digest).restore(s.objects)
    assert not (folder / "best.pt.next").exists() and load_best(tmp_path)["model"] == {}
