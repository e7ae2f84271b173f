"""Missing-label protocol on PLT-VOC (statistics from reference/comic-method.md §9) and on hand-built matrices."""

from __future__ import annotations

import numpy as np
import pytest

from comic.data.labels import read_label_csv
from comic.data.longtail import pareto_subsample
from comic.data.partial import drop_positives


@pytest.fixture(scope="module")
def plt_voc(shared_data) -> np.ndarray:
    g = read_label_csv(shared_data / "voc2012_trainval_labels.csv").labels
    return g[pareto_subsample(g, max_count=1400, b=12, seed=0)]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_plt_voc_statistics(plt_voc, seed):
    observed = drop_positives(plt_voc, rate=0.4, seed=seed)
    assert observed.shape == plt_voc.shape and observed.dtype == np.uint8
    assert (observed.sum(axis=1) >= 1).all(), "every image keeps at least one positive"
    assert not (observed > plt_voc).any(), "a negative became positive"
    assert 0.66 <= observed.sum() / plt_voc.sum() <= 0.74
    assert 1080 <= observed.sum(axis=0).max() <= 1220


def test_same_seed_same_result_other_seed_differs(plt_voc):
    a = drop_positives(plt_voc, 0.4, seed=5)
    assert np.array_equal(a, drop_positives(plt_voc, 0.4, seed=5))
    assert not np.array_equal(a, drop_positives(plt_voc, 0.4, seed=6))


def test_rate_zero_is_identity():
    g = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=np.uint8)
    assert np.array_equal(drop_positives(g, 0.0, seed=0), g)


def test_restored_positive_is_one_original_chosen_uniformly():
    # Every row has exactly the positives {0, 2}; at rate 0.999 almost all rows lose both and get one back.
    g = np.zeros((4000, 3), dtype=np.uint8)
    g[:, [0, 2]] = 1
    observed = drop_positives(g, 0.999, seed=0)
    assert (observed.sum(axis=1) == 1).mean() > 0.99
    assert observed[:, 1].sum() == 0
    share = observed[:, 0].sum() / observed.sum()
    assert 0.45 <= share <= 0.55


def test_row_without_positives_stays_empty():
    g = np.array([[0, 0], [1, 0]], dtype=np.uint8)
    observed = drop_positives(g, 0.9, seed=1)
    assert observed.tolist() == [[0, 0], [1, 0]]


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.4"])
def test_bad_rate_names_value_and_range(rate):
    with pytest.raises(ValueError, match=r"missing rate .*must be in \[0, 1\)") as info:
        drop_positives(np.eye(2, dtype=np.uint8), rate, seed=0)
    assert repr(rate) in str(info.value)


def test_non_binary_labels_rejected():
    with pytest.raises(ValueError, match="only 0 and 1"):
        drop_positives(np.array([[0, 3]]), 0.4, seed=0)
