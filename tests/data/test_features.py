"""The trunk-feature cache of profile `frozen`: its key, reuse without a trunk forward, views per epoch, a damaged file
rebuilt with a warning naming it, and two processes building one cache at once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comic.config import apply_overrides, load_config
from comic.data import features as features_module
from comic.data.build import ensure_benchmark
from comic.data.features import FeatureRecipe, build_feature_loaders, ensure_features, feature_key, prepare_features
from comic.data.reader import load_benchmark
from comic.device import runtime
from comic.engine import fit
from comic.models.backbone import build_trunk

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def frozen(smoke_overrides, tmp_path):
    """The smoke config in profile frozen, with its own data cache (each test builds its feature cache)."""
    return load_config("synthetic", smoke_overrides | {"model.profile": "frozen", "data.feature_views": 3,
                                                       "data.cache_dir": str(tmp_path / "data")})


def _bench(cfg):
    return load_benchmark(ensure_benchmark(cfg.data))


class CountingTrunk:
    """Wraps `build_trunk`: counts the trunks built and the images they forward."""

    def __init__(self, monkeypatch) -> None:
        self.built, self.images = 0, 0
        real = features_module.build_trunk

        def build(cfg):
            trunk, width = real(cfg)
            self.built += 1
            trunk.register_forward_hook(lambda module, inputs, output: self.count(len(inputs[0])))
            return trunk, width

        monkeypatch.setattr(features_module, "build_trunk", build)

    def count(self, n: int) -> None:
        self.images += n


def test_the_key_follows_what_the_features_depend_on(frozen, tmp_path):
    bench = _bench(frozen)
    key = feature_key(bench, FeatureRecipe.of(frozen))
    weights = tmp_path / "tiny.pt"
    torch.save(build_trunk(frozen.model)[0].state_dict(), weights)
    for changed in ({"model.backbone": "resnet18"}, {"data.image_size": 48}, {"data.feature_views": 2},
                    {"data.crop_scale_min": 0.3}, {"model.weights": str(weights)}):
        assert feature_key(bench, FeatureRecipe.of(apply_overrides(frozen, changed))) != key, changed
    for same in ({"seed": 3}, {"method": "bce"}, {"data.num_workers": 2}, {"engine.threads": 1},
                 {"rlc.tau": 0.9}, {"train.epochs": 5}, {"engine.progress": True}):
        assert feature_key(bench, FeatureRecipe.of(apply_overrides(frozen, same))) == key, same
    relabelled = load_benchmark(ensure_benchmark(apply_overrides(frozen, {"data.missing_rate": 0.3}).data))
    assert feature_key(relabelled, FeatureRecipe.of(frozen)) == key  # other labels, the same images and features
    resplit = load_benchmark(ensure_benchmark(apply_overrides(frozen, {"data.split_seed": 1}).data))
    assert feature_key(resplit, FeatureRecipe.of(frozen)) != key  # other images in the splits


def test_a_second_trial_does_no_trunk_forward(frozen, monkeypatch):
    counter = CountingTrunk(monkeypatch)
    first = fit(frozen)
    bench = _bench(frozen)
    expected = 3 * len(bench.train) + len(bench.val) + len(bench.test)
    assert (counter.built, counter.images) == (1, expected)
    second = fit(apply_overrides(frozen, {"seed": 1, "method": "bce"}))
    assert (counter.built, counter.images) == (1, expected)  # the cache was read, no trunk was even built
    assert np.isfinite(first.metrics["best/test/map"]) and np.isfinite(second.metrics["best/test/map"])


def test_the_trial_that_builds_the_cache_trains_as_one_that_reads_it(frozen):
    """Found on real images: the first cell of a study (which built the cache) scored 70.28 and an identical later cell
    70.35, because the extraction's DataLoaders drew from torch's global RNG after fit had seeded it."""
    builder, reader = fit(frozen).metrics, fit(frozen).metrics
    assert builder.keys() == reader.keys()
    same = {k for k in builder if builder[k] == reader[k] or (np.isnan(builder[k]) and np.isnan(reader[k]))}
    differ = {k: (builder[k], reader[k]) for k in builder if k not in same and not k.startswith("perf/")}  # timings
    assert not differ, differ


def test_each_epoch_draws_one_seeded_view_per_image(frozen):
    bench = _bench(frozen)
    cache = prepare_features(frozen)
    assert cache.arrays["train"].shape == (3, len(bench.train), cache.width)

    def epoch(seed: int, number: int) -> torch.Tensor:
        loader = build_feature_loaders(bench, cache, 8, seed)["train"]
        loader.generator.manual_seed(seed * 100_003 + number)  # as the engine reseeds it before each epoch
        return torch.cat([features for features, _, _ in loader])

    assert torch.equal(epoch(0, 1), epoch(0, 1))
    assert not torch.equal(epoch(0, 1), epoch(0, 2)) and not torch.equal(epoch(0, 1), epoch(1, 1))
    views = cache.arrays["train"].astype(np.float32)
    rows = {tuple(np.round(v, 3)) for view in views for v in view}
    assert all(tuple(np.round(f, 3)) in rows for f in epoch(0, 1).numpy())  # every item is one of the cached views
    assert not np.allclose(views[0], views[1])  # the views are different augmentations


def test_a_truncated_file_is_named_and_rebuilt(frozen, caplog):
    cache = prepare_features(frozen)
    train = cache.folder / "train.npy"
    del cache
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="comic.data.features"):
        rebuilt = prepare_features(frozen)
    assert any(str(train) in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert rebuilt.arrays["train"].shape[0] == 3 and np.isfinite(rebuilt.arrays["train"]).all()


RACE = """
import sys, time
from pathlib import Path
from comic.config import load_config
from comic.data.features import prepare_features
go = Path(sys.argv[1])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
cache = prepare_features(load_config("synthetic", sys.argv[2:]))
print("folder", cache.folder)
"""


def test_two_processes_building_one_cache_build_it_once(frozen, tmp_path):
    prepare_features(apply_overrides(frozen, {"data.feature_views": 1}))  # benchmark and image caches exist
    overrides = [f"{k}={v}" for k, v in
                 {"data.benchmark": "synthetic", "data.synthetic_images": frozen.data.synthetic_images,
                  "data.synthetic_test_images": frozen.data.synthetic_test_images, "data.val_size": 32,
                  "data.max_count": 60, "data.image_size": 32, "data.num_workers": 0, "model.backbone": "tiny",
                  "model.weights": "none", "model.profile": "frozen", "data.feature_views": 5,
                  "data.cache_dir": frozen.data.cache_dir, "engine.device": "cpu"}.items()]
    go = tmp_path / "go"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO)\n"
                               + RACE, str(go), *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]  # both past their imports
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    folders = {line for out, _ in outs for line in out.splitlines() if line.startswith("folder")}
    assert len(folders) == 1
    built = sum("cached tiny features" in err for _, err in outs)
    assert built == 1, [err[-1500:] for _, err in outs]  # one built it, the other waited and read it
    cache = prepare_features(load_config("synthetic", overrides))
    assert cache.arrays["train"].shape[0] == 5 and np.isfinite(cache.arrays["train"]).all()


def test_the_feature_path_needs_no_gpu_and_runs_on_the_device_asked(frozen):
    assert runtime(frozen.engine).device.type == "cpu"
    cache = ensure_features(_bench(frozen), frozen, runtime(frozen.engine))
    assert cache.meta["device"] == "cpu" and cache.meta["recipe"]["views"] == 3
