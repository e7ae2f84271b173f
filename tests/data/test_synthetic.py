"""Synthetic COCO-format source: determinism, class design, and the real COCO label path (issue 2, acceptance g)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from comic.data import synthetic
from comic.data.labels import coco_labels

SMALL = {"num_images": 24, "num_test_images": 8, "num_classes": 6, "image_size": 48}


def _annotations(root: Path) -> tuple[bytes, bytes]:
    return (root / synthetic.TRAIN_JSON).read_bytes(), (root / synthetic.TEST_JSON).read_bytes()


def test_same_seed_gives_byte_identical_annotations(tmp_path: Path) -> None:
    a = synthetic.generate(tmp_path / "a", seed=5, **SMALL)
    b = synthetic.generate(tmp_path / "b", seed=5, **SMALL)
    assert _annotations(a) == _annotations(b)
    first = sorted((a / "train").iterdir())[0].name
    assert (a / "train" / first).read_bytes() == (b / "train" / first).read_bytes()


def test_different_seed_gives_different_annotations(tmp_path: Path) -> None:
    a = synthetic.generate(tmp_path / "a", seed=5, **SMALL)
    c = synthetic.generate(tmp_path / "c", seed=6, **SMALL)
    assert _annotations(a)[0] != _annotations(c)[0] and _annotations(a)[1] != _annotations(c)[1]


def test_source_reads_through_the_coco_label_path(tmp_path: Path) -> None:
    root = synthetic.generate(tmp_path / "src", seed=0, **SMALL)
    pool, test = coco_labels(root / synthetic.TRAIN_JSON), coco_labels(root / synthetic.TEST_JSON)
    assert pool.labels.shape == (24, 6) and test.labels.shape == (8, 6)
    positives = pool.labels.sum(1)
    assert positives.min() >= 1 and positives.max() <= 4  # 1-4 objects per image
    assert pool.class_names == [c.name for c in synthetic.make_classes(6)] == test.class_names
    assert pool.category_ids != list(range(1, 7))  # ids have gaps, like COCO's
    for name in pool.file_names[:3]:
        with Image.open(root / "train" / name) as image:
            assert image.format == "JPEG" and image.size == (48, 48)


def test_classes_differ_in_at_least_two_attributes() -> None:
    classes = synthetic.make_classes(20)
    triples = [(c.shape, c.colour, c.texture) for c in classes]
    for i, a in enumerate(triples):
        for b in triples[i + 1:]:
            assert sum(x != y for x, y in zip(a, b, strict=True)) >= 2
    assert len({c.name for c in synthetic.make_classes(80)}) == 80
    assert synthetic.make_classes(20) == classes  # independent of any seed


def test_pool_prior_is_long_tailed_and_scenes_share_the_head_class() -> None:
    prior = synthetic.class_prior(20, 25.0)
    assert np.isclose(prior.sum(), 1) and np.isclose(prior[0] / prior[-1], 25) and (np.diff(prior) < 0).all()
    scenes = synthetic.make_scenes(20)
    assert all(0 in s for s in scenes)
    assert set(np.concatenate(scenes)) == set(range(20))  # every class appears in some scene


def test_ensure_source_reuses_a_complete_source(tmp_path: Path) -> None:
    first = synthetic.ensure_source(tmp_path, 16, 8, 4, seed=1, image_size=40)
    stamp = (first / synthetic.TRAIN_JSON).stat().st_mtime_ns
    again = synthetic.ensure_source(tmp_path, 16, 8, 4, seed=1, image_size=40)
    assert again == first and (again / synthetic.TRAIN_JSON).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left behind
