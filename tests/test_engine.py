"""The trainer: every registry method trains, exact resume, schedules, non-finite losses, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from comic.checkpoint import CheckpointPolicy, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from comic.config import apply_overrides, load_config
from comic.engine import build_optimizer, fit
from comic.meters import LossMeter
from comic.methods import list_methods


def _cfg(smoke_overrides, **extra):
    return load_config("synthetic", smoke_overrides | extra)


@pytest.mark.parametrize("profile", ["finetune", "frozen"])
@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains_with_finite_metrics(method, profile, smoke_overrides):
    """Every registry entry, on images (the trunk trains) and on cached trunk features (only the heads train)."""
    result = fit(_cfg(smoke_overrides, method=method, **{"model.profile": profile}))
    assert len(result.history) == 2
    for key in ("train/loss", "val/map", "val/map_avg", "best/test/map", "best/test/recall", "perf/img_per_s",
                "best/epoch"):
        assert math.isfinite(result.metrics[key]), key
    assert 0 < result.metrics["best/test/map"] <= 100
    assert len(result.per_class["best"]["test_ap"]) == len(result.per_class["best"]["class"])


def test_the_test_set_is_evaluated_on_the_best_weights_once_per_checkpoint(smoke_overrides, tmp_path):
    """Test metrics come from the best-on-val epoch's weights, measured when a checkpoint is written (here at epoch 3
    and the last): the same numbers a test pass at every epoch gives for that epoch."""
    cfg = _cfg(smoke_overrides, **{"train.epochs": 6, "model.profile": "frozen", "train.checkpoint_every_s": 1e9})
    seen = []
    result = fit(cfg, report=lambda metrics, run: seen.append((dict(metrics), run.saved)), workdir=tmp_path,
                 policy=CheckpointPolicy(every_s=math.inf, epochs=frozenset({3})))
    every = fit(apply_overrides(cfg, {"train.test_every_epoch": True}))
    test_at = {int(m["epoch"]): m["test/map"] for m in every.history}
    saved_epochs = [int(m["epoch"]) for m, saved in seen if saved]
    assert saved_epochs == [3, 6]
    for metrics, _ in seen:
        epoch, best_epoch = int(metrics["epoch"]), int(metrics["best/epoch"])
        assert "test/map" not in metrics  # no test pass at the epochs themselves
        tested = any(best_epoch <= e <= epoch for e in saved_epochs)  # a checkpoint since the best epoch
        assert ("best/test/map" in metrics) == tested, epoch
        if tested:
            assert metrics["best/test/map"] == test_at[best_epoch]
    at_three = seen[2][0]
    assert at_three["best/epoch"] < 3  # the best weights were swapped in to be tested, then swapped out again
    assert result.metrics["best/epoch"] == every.metrics["best/epoch"]
    assert [m["val/map"] for m, _ in seen] == [m["val/map"] for m in every.history]  # training unaffected


def test_comic_reports_head_tail_and_correction_metrics(smoke_overrides):
    seen = []
    result = fit(_cfg(smoke_overrides), report=lambda metrics, run: seen.append(metrics))
    assert [m["epoch"] for m in seen] == [1.0, 2.0]
    assert seen[-1] == result.metrics and all("best/val/map" in m for m in seen)  # best so far, every epoch
    assert seen[0]["best/val/map"] <= seen[1]["best/val/map"]
    for key in ("val/head/map", "val/tail/map", "train/loss_mfm_b", "train/loss_rlc_b", "train/loss_htb",
                "rlc/precision", "rlc/recall", "train/lr_balanced_feature"):
        assert key in result.metrics, key


def test_the_metric_list_is_grouped_and_holds_what_is_read(smoke_overrides):
    """Every key under one of the sections MLflow draws; `best/` holds what tables and sweeps read (the prediction's
    val mAPs for selection, every test metric with Table 1's head / tail models), not the sub-models' val curves."""
    keys = set(fit(_cfg(smoke_overrides, **{"train.epochs": 1})).metrics)
    # test/* only as best/test/* (measured on the best weights), or every epoch with train.test_every_epoch
    assert {k.split("/")[0] for k in keys} == {"epoch", "best", "val", "train", "rlc", "perf"}
    assert not [k for k in keys if " " in k]
    best = {k for k in keys if k.startswith("best/")}
    assert {"best/epoch", "best/val/map", "best/val/map_few", "best/test/map", "best/test/head/map",
            "best/test/tail/map", "best/test/map_chance"} <= best
    assert not [k for k in best if k.startswith(("best/val/head", "best/val/tail", "best/val/map_chance"))]
    assert {"val/head/map", "val/tail/map"} <= keys and not [k for k in keys if "plain" in k]


def test_resume_after_a_crash_matches_uninterrupted_run(smoke_overrides, tmp_path, crash_after):
    base = {"train.epochs": 3, "engine.deterministic": True, "engine.threads": 1}
    clean = fit(_cfg(smoke_overrides, **base), workdir=tmp_path / "clean")
    cfg = _cfg(smoke_overrides, **base)
    with pytest.raises(RuntimeError, match="crash after epoch 2"):
        fit(cfg, report=crash_after(2), workdir=tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint")["run"]["epoch"] == 2
    resumed = fit(cfg, workdir=tmp_path / "resumed")  # same command again: resumes from epoch 2
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0, 3.0]
    volatile = ("perf/",)
    for key, value in clean.metrics.items():
        if not key.startswith(volatile) and not (isinstance(value, float) and math.isnan(value)):
            assert resumed.metrics[key] == value, key


def test_resume_refuses_a_different_configuration(smoke_overrides, tmp_path):
    fit(_cfg(smoke_overrides, **{"train.epochs": 1}), workdir=tmp_path)
    with pytest.raises(RuntimeError, match="different run"):
        fit(_cfg(smoke_overrides, **{"rlc.tau": 0.9}), workdir=tmp_path)


def test_step_decay_follows_the_released_schedule(smoke_overrides):
    import numpy as np

    from comic.methods import DataStats, build_method

    cfg = _cfg(smoke_overrides, **{"optim.step_head": 2, "optim.step_tail": 3, "optim.decay_gamma": 0.5})
    stats = DataStats([f"c{i}" for i in range(4)], np.array([50, 20, 5, 1]), np.zeros((8, 4), dtype=np.uint8))
    model = build_method(cfg, stats).model
    optimizer, scheduler = build_optimizer(model, cfg)
    lrs = {g["name"]: [] for g in optimizer.param_groups}
    for _ in range(6):  # epochs 1..6: LR of epoch e = base * gamma ** (e // step)
        for g in optimizer.param_groups:
            lrs[g["name"]].append(g["lr"])
        optimizer.step()  # no gradients: a no-op that keeps the scheduler's call order check quiet
        scheduler.step()
    base = cfg.optim.lr_classifier
    assert lrs["head/classifier"] == pytest.approx([base * 0.5 ** (e // 2) for e in range(1, 7)])
    assert lrs["tail/classifier"] == pytest.approx([base * 0.5 ** (e // 3) for e in range(1, 7)])


def test_the_cpu_optimizer_is_fused_adam_with_coupled_l2(smoke_overrides):
    """Adam's first step worked by hand: g' = g + wd * p (coupled L2), m^ = g', v^ = g'^2, so
    p1 = p - lr * g' / (|g'| + eps); the fused kernel the trainer picks on a CPU must take exactly that step."""
    import numpy as np

    from comic.methods import DataStats, build_method

    cfg = _cfg(smoke_overrides, **{"optim.weight_decay": 0.01})
    stats = DataStats([f"c{i}" for i in range(4)], np.array([50, 20, 5, 1]), np.zeros((8, 4), dtype=np.uint8))
    model = build_method(cfg, stats).model
    optimizer, _ = build_optimizer(model, cfg)
    assert optimizer.defaults["fused"] is True
    torch.manual_seed(0)
    before = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
            before[p] = (p.detach().clone(), group["lr"])
    optimizer.step()
    for p, (p0, lr) in before.items():
        g = p.grad + 0.01 * p0
        torch.testing.assert_close(p.detach(), p0 - lr * g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-7)


def test_non_finite_loss_names_epoch_step_and_terms():
    meter = LossMeter(torch.device("cpu"))
    meter.add(torch.tensor(1.0), {"mfm_b": torch.tensor(0.5), "corrected": torch.zeros(2, 3)})
    meter.add(torch.tensor(float("nan")), {"mfm_b": torch.tensor(float("inf")), "corrected": torch.zeros(2, 3)})
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 4, step 1: loss=nan, mfm_b=inf"):
        meter.check_finite(epoch=4)


def test_training_raises_on_a_diverging_loss(smoke_overrides, monkeypatch):
    from comic.losses import LossCriterion

    original = LossCriterion.forward

    def poisoned(self, out, observed):
        total, parts = original(self, out, observed)
        return total * float("nan"), parts

    monkeypatch.setattr(LossCriterion, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 1, step 0: loss=nan"):
        fit(_cfg(smoke_overrides, method="bce"))


def test_checkpoint_round_trip_restores_rng(tmp_path):
    torch.manual_seed(3)
    state = {"weights": torch.arange(4.0), "rng": rng_state(), "nested": {"epoch": 3, "history": [{"a": 1.0}]}}
    expected = torch.rand(3)
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path)
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected)
    assert loaded["nested"] == state["nested"] and torch.equal(loaded["weights"], state["weights"])
    assert load_checkpoint(tmp_path / "absent") is None
    (tmp_path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="could not be read"):
        load_checkpoint(tmp_path)
