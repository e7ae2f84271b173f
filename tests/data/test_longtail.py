"""Long-tail subsampler: exact reproduction of the published VOC-MLT / PLT-VOC sets, reference counts, errors."""

from __future__ import annotations

import random

import numpy as np
import pytest

from comic.data.labels import VOC_CLASSES, read_label_csv
from comic.data.longtail import pareto_reference_counts, pareto_subsample, rank_classes

PLT_VOC_COUNTS = [15, 93, 24, 38, 390, 48, 575, 81, 983, 10, 543, 132, 30, 62, 1585, 266, 12, 207, 19, 170]


@pytest.fixture(scope="module")
def voc_trainval(shared_data):
    labels = read_label_csv(shared_data / "voc2012_trainval_labels.csv")
    assert labels.labels.shape == (11540, 20) and tuple(labels.class_names) == VOC_CLASSES
    return labels


def test_reproduces_wu_voc_mlt_ids(voc_trainval, shared_data):
    # Wu et al.'s published VOC-MLT id list (max=800, b=6, seed 0): must match as a set, exactly.
    expected = set((shared_data / "voc_mlt_img_id.txt").read_text().split())
    rows = pareto_subsample(voc_trainval.labels, max_count=800, b=6, seed=0)
    assert len(rows) == len(set(rows)) == 1142
    assert {voc_trainval.image_ids[r] for r in rows} == expected


def test_reproduces_plt_voc_counts(voc_trainval):
    # The COMIC paper's PLT-VOC (max=1400, b=12, seed 0): 2,569 images, per-class counts from DESIGN §4.
    rows = pareto_subsample(voc_trainval.labels, max_count=1400, b=12, seed=0)
    assert len(rows) == 2569
    assert voc_trainval.labels[rows].sum(axis=0).tolist() == PLT_VOC_COUNTS


def test_rng_switch_uses_and_advances_the_given_rng(voc_trainval):
    g = voc_trainval.labels
    rng = random.Random(0)
    first = pareto_subsample(g, 800, 6, rng=rng)
    assert first == pareto_subsample(g, 800, 6, seed=0)
    assert rng.getstate() != random.Random(0).getstate()
    # A second build continues the stream (as the published script does for COCO after VOC), so it differs.
    assert pareto_subsample(g, 800, 6, rng=rng) != first


def test_reference_counts_hand_computed():
    # b=1, 2 classes: x = [1, 100]; pdf = [1, 1e-4]; ref = int(pdf * 9 / 1 + 1) = [10, 1].
    assert pareto_reference_counts(2, max_count=10, b=1).tolist() == [10, 1]
    # Last class sits at ppf(0.99), where pdf = b * 0.01^((b+1)/b): 1399 * 0.01^(13/12) + 1 = 10.53 -> 10.
    ref = pareto_reference_counts(20, max_count=1400, b=12)
    assert ref[0] == 1400 and ref[-1] == 10 and (np.diff(ref) <= 0).all()


def test_disjoint_classes_hit_their_reference_counts():
    # Two classes, 20 images each, never together: the sampler can meet ref = [10, 1] exactly.
    g = np.zeros((40, 2), dtype=np.uint8)
    g[:20, 0] = 1
    g[20:, 1] = 1
    rows = pareto_subsample(g, max_count=10, b=1, seed=3)
    assert sorted(g[rows].sum(axis=0).tolist()) == [1, 10]


def test_class_without_images_ranks_last_and_is_harmless():
    g = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1], [1, 0, 1]], dtype=np.uint8)
    assert rank_classes(g)[-1] == 1
    rows = pareto_subsample(g, max_count=3, b=2, seed=0)
    assert set(rows) <= set(range(4)) and rows == pareto_subsample(g, max_count=3, b=2, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_count": 0, "b": 6.0, "min_count": 1}, r"max_count=0 < min_count=1"),
        ({"max_count": 10, "b": 0.0}, r"b=0.0: the Pareto shape must be > 0"),
        ({"max_count": 10, "b": -1.0}, r"b=-1.0"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pareto_subsample(np.eye(3, dtype=np.uint8), **kwargs)


@pytest.mark.parametrize(
    ("labels", "match"),
    [(np.zeros((0, 3)), "non-empty"), (np.array([[0, 2], [1, 0]]), "only 0 and 1"), (np.ones(4), r"\[N, C\]")],
)
def test_bad_label_matrix_raises(labels, match):
    with pytest.raises(ValueError, match=match):
        pareto_subsample(labels, max_count=10, b=6)
