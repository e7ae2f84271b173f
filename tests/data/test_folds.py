"""Disjoint test folds (`data.folds`, `data.fold`): a fold's test images never train or validate it, the folds cover
the pool, each split keeps its labelling rule, and the fold is part of the benchmark's identity and card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from comic.config import ConfigError, load_config
from comic.data import synthetic
from comic.data.build import build_benchmark
from comic.data.folds import fold_rows
from comic.data.reader import CARD_JSON, CARD_MD, BenchmarkError, load_benchmark
from comic.data.sources import BuildParams, coco_root_source, voc_source

REPO = Path(__file__).resolve().parents[2]
VOC = REPO.parent / "shared" / "data" / "voc2007-dev" / "VOCdevkit"


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("src") / "source", num_images=60, num_test_images=21,
                              num_classes=6, seed=3, image_size=32)


@pytest.mark.parametrize("n, k", [(10, 2), (81, 3), (7, 7), (1000, 5)])
def test_fold_rows_are_disjoint_nearly_equal_and_cover_the_pool(n: int, k: int) -> None:
    parts = fold_rows(n, k, seed=4)
    assert sorted(r for part in parts for r in part) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert fold_rows(n, k, seed=4) == parts and fold_rows(n, k, seed=5) != parts or n == k


def _images(split) -> set[str]:
    return {str(p) for p in split.paths}


@pytest.mark.parametrize("k", [2, 3])
def test_coco_format_folds_keep_test_images_out_of_train_and_val(coco: Path, tmp_path: Path, k: int) -> None:
    tests = []
    for fold in range(k):
        params = BuildParams(max_count=15, pareto_b=6.0, val_size=6, split_seed=1, folds=k, fold=fold)
        bench = load_benchmark(build_benchmark(coco_root_source(coco), params, tmp_path))
        test = _images(bench.test)
        assert not test & (_images(bench.train) | _images(bench.val))
        assert all(Path(p).is_file() for p in test | _images(bench.train))  # train/ and test/ under one root
        assert bench.card["parameters"]["folds"] == k and bench.card["parameters"]["fold"] == fold
        assert f"Test fold {fold} of {k}" in (bench.root / CARD_MD).read_text()
        tests.append(test)
    union = set().union(*tests)
    assert sum(map(len, tests)) == len(union) == 60 + 21  # disjoint, and the pool and test images together


def test_the_fold_is_part_of_the_identity_and_no_folds_keeps_the_old_one(coco: Path, tmp_path: Path) -> None:
    base = BuildParams(max_count=15, pareto_b=6.0, val_size=6)
    folders = {build_benchmark(coco_root_source(coco), p, tmp_path).name
               for p in (base, BuildParams(**{**base.__dict__, "folds": 2}),
                         BuildParams(**{**base.__dict__, "folds": 2, "fold": 1}))}
    assert len(folders) == 3
    assert "folds" not in base.hashed() and base.hashed() == {k: v for k, v in base.__dict__.items()
                                                               if k not in ("folds", "fold")}


@pytest.mark.parametrize("folds, fold", [(1, 0), (3, 3), (2, -1), (-2, 0)])
def test_bad_fold_settings_are_errors_naming_the_keys(folds: int, fold: int) -> None:
    with pytest.raises(ConfigError, match="data.fold"):
        load_config("synthetic", {"data.folds": folds, "data.fold": fold})
    with pytest.raises(BenchmarkError, match="data.folds"):
        BuildParams(folds=folds, fold=fold).check()


@pytest.mark.skipif(not VOC.is_dir(), reason="needs ../shared/data/voc2007-dev (real VOC2007 photos)")
def test_voc_folds_over_devtrain_and_devtest_use_each_splits_rule(tmp_path: Path) -> None:
    source = voc_source(VOC, 2007, "devtrain", "devtest")
    benches = [load_benchmark(build_benchmark(source, BuildParams(longtail="none", val_size=100, folds=3, fold=f,
                                                                   missing_rate=0.0), tmp_path)) for f in range(3)]
    tests = [_images(b.test) for b in benches]
    assert sum(map(len, tests)) == len(set().union(*tests)) == 2500
    for bench, test in zip(benches, tests, strict=True):
        assert not test & (_images(bench.train) | _images(bench.val))
    # A class flagged 0 (difficult only) is positive under the pool's rule, negative under the test set's.
    flags = _difficult_only(VOC / "VOC2007" / "ImageSets" / "Main")
    checked = 0
    for bench in benches:
        names = list(bench.class_names)
        for split, positive in ((bench.test, 0), (bench.train, 1)):
            for row, image_id in enumerate(split.image_ids):
                for cls in flags.get(str(image_id), ()):
                    assert split.full[row, names.index(cls)] == positive
                    checked += 1
    assert checked > 0


def _difficult_only(main: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for listing in main.glob("*_dev*.txt"):
        cls = listing.name.rsplit("_", 1)[0]
        for line in listing.read_text().splitlines():
            image_id, flag = line.split()
            if flag == "0":
                out.setdefault(image_id, []).append(cls)
    return out


def test_the_build_cli_takes_folds(coco: Path, tmp_path: Path, capsys) -> None:
    from comic.data.__main__ import main

    assert main(["build", "coco-format", "--root", str(coco), "--out", str(tmp_path), "--val-size", "5",
                 "--max-count", "15", "--folds", "3", "--fold", "2", "-q"]) == 0
    card = json.loads(next(tmp_path.glob("coco-format-*/" + CARD_JSON)).read_text())
    assert (card["parameters"]["folds"], card["parameters"]["fold"]) == (3, 2)
    assert card["sizes"]["test"] == len(fold_rows(81, 3, 0)[2])
    assert main(["build", "coco-format", "--root", str(coco), "--out", str(tmp_path), "--folds", "1"]) == 2
    assert "error: " in capsys.readouterr().err
    assert np.isfinite(card["labels"]["train_retention"])
