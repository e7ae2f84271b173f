"""AP, shot groups, mAP / recall summary and RLC correction metrics (comic-method.md §11)."""

from __future__ import annotations

import csv
import logging
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from comic.metrics import (
    SHOT_GROUPS,
    average_precision,
    chance_map,
    correction_counts,
    correction_metrics,
    evaluate_scores,
    shot_groups,
)


def test_average_precision_matches_sklearn_on_tie_free_data():
    rng = np.random.default_rng(0)
    scores = rng.random((200, 7))  # continuous: no ties
    targets = (rng.random((200, 7)) < np.linspace(0.02, 0.6, 7)).astype(int)
    targets[:, 3] = 0  # a class without positives
    ap = average_precision(scores, targets)
    assert np.isnan(ap[3])
    for c in set(range(7)) - {3}:
        assert ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=1e-6)


def test_shot_group_thresholds():
    groups = shot_groups(np.array([1240, 100, 99, 20, 19, 6]))
    assert groups.tolist() == ["many", "many", "medium", "medium", "few", "few"]


def test_plt_coco_shot_split(shared_data):
    with open(shared_data / "plt_coco_observed_counts.csv") as fh:
        counts = np.array([int(row["observed_positive_images"]) for row in csv.DictReader(fh)])
    groups = shot_groups(counts)
    assert [int((groups == g).sum()) for g in SHOT_GROUPS] == [25, 29, 26]


def test_evaluate_scores_excludes_classes_without_positives(caplog):
    train_counts = np.array([500, 150, 50, 30, 10, 5])  # many, many, medium, medium, few, few
    targets = np.array([[1, 0, 1, 0, 1, 0], [0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0]])
    scores = np.array([[0.9, 0.1, 0.8, 0.3, 0.6, 0.2], [0.2, 0.7, 0.4, 0.1, 0.3, 0.1],
                       [0.6, 0.4, 0.3, 0.2, 0.2, 0.3], [0.1, 0.3, 0.2, 0.9, 0.4, 0.2]])
    with caplog.at_level(logging.DEBUG, logger="comic.metrics"):
        out = evaluate_scores(scores, targets, train_counts)
    assert "excluded 1 classes" in caplog.text
    ap = average_precision(scores, targets)
    assert out["num_excluded_classes"] == 1.0
    assert out["map"] == pytest.approx(100 * np.mean(ap[:5]))
    assert out["map_many"] == pytest.approx(100 * np.mean(ap[:2]))
    assert out["map_medium"] == pytest.approx(100 * np.mean(ap[2:4]))
    assert out["map_few"] == pytest.approx(100 * ap[4])  # class 5 has no test positive
    assert out["map_avg"] == pytest.approx((out["map_many"] + out["map_medium"] + out["map_few"]) / 3)
    # micro recall at 0.5: positives scored >= 0.5 are (0,0) (0,2) (0,4) (1,1) (2,0) (3,3) of 9 positives
    assert out["recall"] == pytest.approx(100 * 6 / 9)
    assert set(out) == {"map", "map_many", "map_medium", "map_few", "map_avg", "recall", "num_excluded_classes"}


def test_evaluate_scores_with_an_empty_group():
    out = evaluate_scores(np.array([[0.9, 0.1], [0.2, 0.8]]), np.eye(2), np.array([500, 300]))
    assert out["map"] == 100.0 and math.isnan(out["map_few"]) and out["map_avg"] == 100.0


def test_correction_counts_and_metrics():
    observed = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0]])
    full = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]])
    corrected = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]])  # true: (0,1) (1,0); false: (0,2)
    groups = np.array(["many", "medium", "few", "few"])
    counts = correction_counts(corrected.float(), observed.float(), full.float())
    # per class [true, made, missing]: missing positives (0,1) medium, (0,3) few, (1,0) many, (1,3) few
    assert counts.tolist() == [[1, 1, 1], [1, 1, 1], [0, 1, 0], [0, 0, 2]]
    total = counts + correction_counts(corrected, observed, full)
    metrics = correction_metrics(total, groups)
    assert metrics["rlc/precision"] == pytest.approx(2 / 3) and metrics["rlc/recall"] == pytest.approx(2 / 4)
    assert metrics["rlc/precision_many"] == 1.0 and metrics["rlc/recall_few"] == 0.0
    assert metrics["rlc/precision_few"] == 0.0 and metrics["rlc/corrections"] == 6.0
    assert (metrics["rlc/tp"], metrics["rlc/fp"]) == (4.0, 2.0)
    assert math.isnan(correction_metrics(torch.zeros(4, 3, dtype=torch.long), groups)["rlc/precision"])


def test_chance_map_is_mean_prevalence_and_expected_random_ap():
    targets = np.zeros((10, 3))
    targets[:5, 0], targets[:1, 1] = 1, 1  # prevalence 0.5, 0.1; class 2 has no positive (excluded)
    assert chance_map(targets) == pytest.approx(100 * (0.5 + 0.1) / 2)
    rng = np.random.default_rng(0)  # a random ranking's AP averages to about the prevalence
    big = (rng.random((400, 2)) < [0.3, 0.1]).astype(int)
    mean_ap = np.mean([np.nanmean(average_precision(rng.random(big.shape), big)) for _ in range(200)])
    assert mean_ap == pytest.approx(chance_map(big) / 100, abs=0.02)
