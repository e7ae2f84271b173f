"""Real photos (`../shared/data/voc2007-dev`, skipped without it): the `voc` builder gives the per-class counts of the
data README, and COMIC on cached ImageNet MobileNetV2 features beats the label-frequency ranking after 2 epochs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from comic.config import load_config
from comic.data.__main__ import main as build_cli
from comic.data.labels import VOC_CLASSES
from comic.data.reader import load_benchmark
from comic.engine import fit

# ../shared/data/README.md: positive images per class (flag 1 or 0) of the sets, VOC class order.
DEVTRAIN = [65, 72, 118, 53, 105, 66, 255, 103, 182, 43, 88, 144, 85, 86, 693, 92, 32, 118, 85, 89]
DEVTEST = [48, 50, 64, 34, 48, 34, 146, 63, 100, 28, 42, 66, 59, 37, 377, 61, 17, 70, 43, 55]


@pytest.fixture(scope="module")
def voc_root(shared_data) -> Path:
    return shared_data / "voc2007-dev" / "VOCdevkit"


def _flags(voc: Path, image_set: str) -> dict[str, np.ndarray]:
    """{class: flags} read straight from the ImageSets files (an independent reading of the format)."""
    main = voc / "VOC2007" / "ImageSets" / "Main"
    return {c: np.array([int(line.split()[1]) for line in (main / f"{c}_{image_set}.txt").read_text().split("\n")
                         if line.strip()]) for c in VOC_CLASSES}


def test_voc_builder_gives_the_readme_counts(voc_root, tmp_path, capsys):
    argv = ["build", "voc", "--root", str(voc_root), "--year", "2007", "--train-set", "devtrain", "--test-set",
            "devtest", "--longtail", "none", "--val-size", "300", "--missing-rate", "0", "--out", str(tmp_path)]
    assert build_cli(argv) == 0
    folder = capsys.readouterr().out.strip().splitlines()[-1].split("benchmark: ")[1]
    bench = load_benchmark(folder)
    pool = bench.train.full.sum(0) + bench.val.full.sum(0)  # the whole devtrain pool: train + validation
    assert pool.tolist() == DEVTRAIN and len(bench.train) + len(bench.val) == 1600
    test_flag_one = [int((f == 1).sum()) for f in _flags(voc_root, "devtest").values()]
    assert bench.test.full.sum(0).tolist() == test_flag_one and len(bench.test) == 900  # test rule: flag 1
    assert [int((f >= 0).sum()) for f in _flags(voc_root, "devtest").values()] == DEVTEST  # README's rule: 1 or 0


@pytest.fixture(scope="module")
def small_voc(voc_root, tmp_path_factory) -> Path:
    """A VOCdevkit whose VOC2007 holds the real images and two small sets: 200 devtrain images, 120 devtest."""
    root = tmp_path_factory.mktemp("small_voc") / "VOCdevkit"
    voc, source = root / "VOC2007", voc_root / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for folder in ("JPEGImages", "Annotations"):
        os.symlink(source / folder, voc / folder)
    for name, image_set, count in (("small-train", "devtrain", 200), ("small-test", "devtest", 120)):
        for cls in VOC_CLASSES:
            lines = (source / "ImageSets" / "Main" / f"{cls}_{image_set}.txt").read_text().splitlines()[:count]
            (voc / "ImageSets" / "Main" / f"{cls}_{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_comic_on_cached_mobilenet_features_beats_chance(small_voc, offline_imagenet, tmp_path):
    cfg = load_config("voc2007-dev", [f"data.root={small_voc}", "data.voc_train_set=small-train",
                                      "data.voc_test_set=small-test", "data.val_size=40", "data.image_size=112",
                                      "data.feature_views=1", "data.num_workers=0", f"data.cache_dir={tmp_path}",
                                      "train.epochs=2", "engine.progress=false", "engine.device=cpu"])
    result = fit(cfg)
    chance, comic = result.metrics["best/test/map_chance"], result.metrics["best/test/map"]
    assert 3 < chance < 30 and comic > chance + 10, (comic, chance)
