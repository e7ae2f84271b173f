"""Pareto long-tail subsampler: an exact re-implementation of Wu et al.'s (ECCV 2020) published algorithm.

Owns the reference counts (`pareto_reference_counts`) and the greedy add/remove pass (`pareto_subsample`).
"Exact" means: with the same label matrix, parameters and seed, the same rows are selected as by the published
script. That depends on details that look incidental but are not: one `random.Random`, Python `set`s of row
indices built in row order, `rng.sample(tuple(a_set), k)` and the precise add/remove sequence. Do not
"simplify" them (e.g. to numpy sampling or sorted lists) without re-running the reproduction tests.
"""

from __future__ import annotations

import logging
import random

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["pareto_reference_counts", "pareto_subsample", "rank_classes"]


def pareto_reference_counts(num_classes: int, max_count: int, b: float, min_count: int = 1) -> np.ndarray:
    """Target image count per class rank (highest first): int(pareto(b).pdf(x) * (max - min) / b + min).

    x is `num_classes` points linearly spaced between the Pareto ppf at 0 and at 0.99. Returns [num_classes]
    int64, non-increasing, ref[0] == max_count.
    """
    _check_params(max_count, b, min_count)
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes}: must be >= 1")
    # Closed forms of scipy.stats.pareto(b): ppf(q) = (1 - q)^(-1/b), pdf(x) = b / x^(b + 1) for x >= 1.
    x = np.linspace(1.0, (1.0 - 0.99) ** (-1.0 / b), num_classes)
    pdf = b / x ** (b + 1.0)
    # int() truncation (not rounding) is part of the published algorithm.
    return np.array([int(v) for v in pdf * (max_count - min_count) / b + min_count], dtype=np.int64)


def rank_classes(labels: np.ndarray) -> list[int]:
    """Class indices ordered by the column sums of P[i, j] = #(i and j) / #(i), highest first.

    labels: [N, C] 0/1. A class with no images has an all-zero row in P (it conditions nothing) and ranks by
    its column sum, which is 0, so it goes last. Ties keep the lower class index first (stable sort).
    """
    g = labels.astype(np.float64)
    co = g.T @ g  # [C, C] co-occurrence counts; the diagonal holds #(i)
    per_class = np.diag(co).copy()
    p = np.divide(co, per_class[:, None], out=np.zeros_like(co), where=per_class[:, None] > 0)
    score = p.sum(axis=0)
    return [int(c) for c in np.argsort(-score, kind="stable")]


def pareto_subsample(
    labels: np.ndarray,
    max_count: int,
    b: float,
    seed: int = 0,
    min_count: int = 1,
    rng: random.Random | None = None,
) -> list[int]:
    """Select a long-tailed subset of rows of `labels` ([N, C] 0/1, rows in source order).

    Returns the selected row indices (order not significant). With `rng` given, it is used instead of
    `random.Random(seed)` and left advanced: the published script seeds once and builds VOC before COCO, so
    passing the RNG used for a first build reproduces the second build of that script.
    """
    _check_params(max_count, b, min_count)
    g = _check_labels(labels)
    rng = random.Random(seed) if rng is None else rng
    num_classes = g.shape[1]
    ref = pareto_reference_counts(num_classes, max_count, b, min_count)
    # Per-class row sets and per-row class lists, both built in row order (set iteration order matters).
    rows_of_class = [np.flatnonzero(g[:, c]).tolist() for c in range(num_classes)]
    classes_of_row = [np.flatnonzero(row).tolist() for row in g]
    state = _Selection(num_classes, classes_of_row)
    for k, cls in enumerate(rank_classes(g)):
        need = int(ref[k] - state.count[cls])
        if need < 0:
            for row in rng.sample(tuple(state.selected[cls]), -need):
                state.remove(row)
        elif need > 0:
            pool = set(rows_of_class[cls]) - state.selected[cls]
            for row in rng.sample(tuple(pool), min(need, len(pool))):
                state.add(row)
    chosen = set().union(*state.selected)
    log.info("pareto_subsample(max=%d, b=%g): %d of %d rows selected", max_count, b, len(chosen), g.shape[0])
    return sorted(chosen)


class _Selection:
    """Selected rows per class and per-class counts, updated for every class of a row on each add/remove."""

    def __init__(self, num_classes: int, classes_of_row: list[list[int]]) -> None:
        self.classes_of_row = classes_of_row
        self.selected: list[set[int]] = [set() for _ in range(num_classes)]
        self.count = [0] * num_classes

    def add(self, row: int) -> None:
        for c in self.classes_of_row[row]:
            self.selected[c].add(row)
            self.count[c] += 1

    def remove(self, row: int) -> None:
        for c in self.classes_of_row[row]:
            self.selected[c].remove(row)
            self.count[c] -= 1


def _check_params(max_count: int, b: float, min_count: int) -> None:
    if max_count < min_count:
        raise ValueError(f"max_count={max_count} < min_count={min_count}: max_count must be >= min_count")
    if min_count < 0:
        raise ValueError(f"min_count={min_count}: must be >= 0")
    if not b > 0:
        raise ValueError(f"b={b}: the Pareto shape must be > 0")


def _check_labels(labels: np.ndarray) -> np.ndarray:
    g = np.asarray(labels)
    if g.ndim != 2 or g.size == 0:
        raise ValueError(f"labels must be a non-empty [N, C] matrix, got shape {g.shape}")
    if not np.isin(g, (0, 1)).all():
        raise ValueError("labels must contain only 0 and 1 (got other values)")
    return g.astype(np.uint8)
