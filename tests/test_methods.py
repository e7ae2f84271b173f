"""The registry and the baselines' wiring: loud errors, data-derived constructor arguments, LWS stages, ML-GCN."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from comic.checkpoint import load_checkpoint
from comic.config import ConfigError, load_config
from comic.data.build import ensure_benchmark
from comic.data.images import build_loaders
from comic.data.reader import load_benchmark
from comic.data.sampler import ClassAwareSampler
from comic.engine import _train_loader, fit
from comic.losses import DB, PartialASL
from comic.methods import METHODS, DataStats, build_method, list_methods, register, search_space
from comic.tuning.space import default_point, parse_space

EXPECTED = {"comic", "bce", "focal", "asl", "db", "db-focal", "lws", "pseudo-label", "ml-gcn", "hill", "splc", "p-asl"}


def _stats(num_classes: int = 4) -> DataStats:
    observed = np.zeros((10, num_classes), dtype=np.uint8)
    observed[:6, 0] = observed[:3, 1] = observed[:1, 2] = 1  # class 3 never observed
    return DataStats([f"c{i}" for i in range(num_classes)], observed.sum(0), observed)


def test_registry_holds_the_paper_baselines_and_raises_loudly():
    assert set(list_methods()) == EXPECTED
    with pytest.raises(KeyError, match="unknown method 'dbfocal'; valid methods: asl, bce, comic"):
        build_method(load_config("synthetic", ["method=dbfocal"]), _stats())
    with pytest.raises(KeyError, match="method 'bce' is already registered"):
        register("bce")(METHODS["bce"])


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_every_entry_declares_a_search_space_that_builds_at_its_corners(method):
    """The space parses against the preset configs, holds every default (the sweep's first point), and the method
    builds at both ends of every range (a loss parameter its loss does not take, or a bad value, would raise)."""
    space = search_space(method)
    assert {"optim.lr_feature", "optim.lr_classifier", "optim.weight_decay"} <= set(space)
    for preset in ("synthetic", "voc2007-dev-lt"):
        base = load_config(preset, [f"method={method}", "model.label_embeddings=random"])
        dims = parse_space(space, base)
        assert default_point(dims, base) is not None, preset
    for end in ("low", "high"):
        cfg = load_config("synthetic", {"method": method} | {k: getattr(d, end) for k, d in dims.items()})
        build_method(cfg, _stats())
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        search_space("nope")


def test_a_loss_parameter_left_unset_is_searched_from_the_loss_default():
    base = load_config("synthetic", ["method=asl", "loss.baseline.clip=0.1"])
    point = default_point(parse_space(search_space("asl"), base), base)
    # ASL's published defaults (Ridnik et al. 2021): gamma- 4, gamma+ 0; clip as set here
    assert (point["loss.baseline.gamma_neg"], point["loss.baseline.gamma_pos"], point["loss.baseline.clip"]) == \
        (4.0, 0.0, 0.1)


def test_baseline_hyperparameters_come_from_loss_baseline_and_typos_raise():
    method = build_method(load_config("synthetic", ["method=asl", "loss.baseline.gamma_neg=2"]), _stats())
    assert method.criterion.loss.gamma_neg == 2
    with pytest.raises(ConfigError, match="loss.baseline.gama_neg: not a parameter of method 'asl'.*gamma_neg"):
        build_method(load_config("synthetic", ["method=asl", "loss.baseline.gama_neg=2"]), _stats())


def test_db_gets_observed_counts_and_class_aware_sampling():
    method = build_method(load_config("synthetic", ["method=db"]), _stats())
    assert isinstance(method.criterion.loss, DB) and method.hooks.sampler(1) == "class-aware"
    by_hand = DB(class_counts=torch.tensor([6.0, 3.0, 1.0, 0.0]), num_images=10, reduction="sum")
    logits, targets = torch.randn(5, 4), (torch.rand(5, 4) < 0.4).float()
    assert torch.equal(method.criterion.loss(logits, targets), by_hand(logits, targets))
    reference = build_method(load_config("synthetic", ["method=db", "loss.baseline.reduction=mean"]), _stats())
    torch.testing.assert_close(reference.criterion.loss(logits, targets), by_hand(logits, targets) / 20)  # B*C


def test_p_asl_prior_is_the_observed_frequency():
    loss = build_method(load_config("synthetic", ["method=p-asl"]), _stats()).criterion.loss
    assert isinstance(loss, PartialASL)
    assert loss.class_prior.tolist() == pytest.approx([0.6, 0.3, 0.1, 0.0])


def test_class_aware_loader_is_used_when_the_hooks_ask(smoke_overrides):
    cfg = load_config("synthetic", smoke_overrides)
    loaders = build_loaders(load_benchmark(ensure_benchmark(cfg.data)), cfg.data, 8, seed=0)
    loader = _train_loader(loaders, "class-aware", seed=0, epoch=1)
    assert isinstance(loader.sampler, ClassAwareSampler) and loader is not loaders["train"]
    first = [b[1] for b in loader]
    again = [b[1] for b in _train_loader(loaders, "class-aware", seed=0, epoch=1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # reseeded: same epoch, same batches
    with pytest.raises(ValueError, match="unknown sampler 'balanced'"):
        _train_loader(loaders, "balanced", seed=0, epoch=1)


def test_lws_trains_the_network_then_only_the_scales(smoke_overrides, tmp_path):
    cfg = load_config("synthetic", smoke_overrides | {"method": "lws", "train.epochs": 3,
                                                      "loss.baseline": {"stage2_epochs": 1},
                                                      "train.checkpoint_every_s": 0})
    snapshots = []  # the model state saved at each epoch end (the checkpoint is written before `report`)
    fit(cfg, report=lambda m, run: snapshots.append(load_checkpoint(tmp_path / "checkpoint")["objects"]["model"]),
        workdir=tmp_path)
    after_stage1, after_stage2 = snapshots[1], snapshots[2]
    assert torch.equal(snapshots[0]["scale"], torch.ones_like(after_stage1["scale"]))  # stage 1: f stays 1
    assert not torch.equal(after_stage2["scale"], after_stage1["scale"])  # stage 2 learns f ...
    for key, value in after_stage1.items():  # ... and nothing else: weights and BN statistics frozen
        if key != "scale" and value.is_floating_point():
            assert torch.equal(after_stage2[key], value), key
    with pytest.raises(ConfigError, match="stage2_epochs=3: must be in"):
        build_method(load_config("synthetic", ["method=lws", "train.epochs=3", "loss.baseline.stage2_epochs=3"]),
                     _stats())


def test_ml_gcn_embeddings_from_file_or_random(tmp_path, shared_data):
    voc = load_config("plt-voc", ["method=ml-gcn", "model.backbone=tiny", "model.weights=none",
                                  f"model.label_embeddings={shared_data / 'glove_voc20_300d.npy'}"])
    model = build_method(voc, _stats(20)).model
    glove = torch.as_tensor(np.load(shared_data / "glove_voc20_300d.npy"))
    assert torch.equal(model.gcn.embeddings, glove) and model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 20)
    with pytest.raises(ValueError, match=r"shape \(20, 300\), expected \[4, E\]"):
        build_method(voc, _stats(4))
    with pytest.raises(ValueError, match="needs model.label_embeddings"):
        build_method(load_config("synthetic", ["method=ml-gcn", "model.label_embeddings="]), _stats())


def test_baselines_script_smoke(tmp_path, smoke_overrides, script, capsys, restore_torch_globals):
    argv = ["--smoke-test", "--seeds", "0", "--study-dir", str(tmp_path / "study"), "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db", f"data.cache_dir={smoke_overrides['data.cache_dir']}",
            "engine.progress=false", "engine.threads=1"]
    assert script("experiments/baselines.py").main(argv) == 0
    out = capsys.readouterr().out
    assert "PAPER - Table 1, PLT-COCO" in out and "NOT produced by this run" in out
    for label in ("BCE", "DB-Focal", "LWS", "ML-GCN", "P-ASL", "SPLC", "COMIC", "BCE (full labels)"):
        assert f"| {label} | 0 | finished |" in out, label
    # every method placed between BCE on the observed labels (0 %) and BCE on the full labels (100 %)
    assert "% of the gap closed" in out
    gap = pd.read_csv(tmp_path / "study" / "report" / "gap.csv").set_index(["metric", "arm"])["mean"]
    assert gap[("total", "BCE")] == pytest.approx(0.0) and gap[("total", "BCE (full labels)")] == pytest.approx(100.0)
    assert gap.loc["total"].notna().all()


def test_baselines_script_shows_the_paper_table_of_the_closest_benchmark(script):
    module = script("experiments/baselines.py")
    for preset, source in (("plt-voc", "PLT-VOC"), ("voc2007-dev", "PLT-VOC"), ("voc2007-dev-lt", "PLT-VOC"),
                           ("plt-coco", "PLT-COCO"), ("synthetic", "PLT-COCO")):
        table = module.paper_table(preset)
        assert table.source.startswith(f"Table 1, {source}"), preset
        assert table.rows["COMIC"][3] == ("81.53 ± 0.35" if source == "PLT-VOC" else "55.08 ± 0.14")
