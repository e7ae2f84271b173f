"""A run's per-image test scores at its best-on-validation epoch, kept so that statistics over test images
(`comic.report.bootstrap`) can be computed after the fact without retraining.

`test_scores.npz` in the run's work directory (and as the MLflow artifact `scores/test_scores.npz`):
    scores        [N, C] float32  sigmoid scores of the prediction (float32: the metrics recomputed from the file
                                  equal the logged `best/test/*` exactly)
    targets       [N, C] uint8    full test labels
    image_ids     [N]    str      the test images, in row order
    train_counts  [C]    int64    observed training counts (the run's shot groups)
    epoch         []     int64    the best-on-validation epoch the scores belong to
About 90 KB for 900 images and 20 classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from comic._io import UserError, atomic_write

TEST_SCORES = "test_scores.npz"
ARTIFACT_DIR = "scores"  # where tracked runs log the file in MLflow


@dataclass(frozen=True, eq=False)
class TestScores:
    """One run's test scores: scores [N, C], targets [N, C], image_ids [N], train_counts [C], epoch."""

    scores: np.ndarray
    targets: np.ndarray
    image_ids: tuple[str, ...]
    train_counts: np.ndarray
    epoch: int


def write_test_scores(path: Path, scores: np.ndarray, targets: np.ndarray, image_ids: Sequence,
                      epoch: int, train_counts: np.ndarray) -> Path:
    """Write the file atomically (a crash never leaves half of it)."""
    arrays = {"scores": np.asarray(scores, dtype=np.float32), "targets": np.asarray(targets, dtype=np.uint8),
              "image_ids": np.asarray([str(i) for i in image_ids]), "epoch": np.int64(epoch),
              "train_counts": np.asarray(train_counts, dtype=np.int64)}

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:  # a file object: np.savez would append '.npz' to a path without it
            np.savez_compressed(fh, **arrays)

    return atomic_write(path, write)


def read_test_scores(path: Path) -> TestScores:
    """Read the file; UserError naming it when it is missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            out = TestScores(data["scores"], data["targets"], tuple(str(i) for i in data["image_ids"]),
                             data["train_counts"], int(data["epoch"]))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: missing or damaged test scores ({err}); rerun the cell to write it again") from err
    if out.scores.shape != out.targets.shape or out.scores.shape[0] != len(out.image_ids):
        raise UserError(f"{path}: scores {out.scores.shape}, targets {out.targets.shape} and "
                        f"{len(out.image_ids)} image ids do not agree")
    return out
