"""Per-class decision thresholds chosen on a validation split."""

from __future__ import annotations

import numpy as np

RULE = "f1-on-val"
NO_POSITIVE_THRESHOLD = 0.5  # a class without a validation positive: the plain sigmoid midpoint


def f1_thresholds(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per class, the score t maximising F1 of `score >= t` on the given split (ties: the highest such t).

    scores: [N, C] probabilities; targets: [N, C] 0/1 -> [C]. A class without a positive gets 0.5.
    """
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0
    return np.array([_best_threshold(scores[:, c], positive[:, c]) for c in range(scores.shape[1])])


def _best_threshold(score: np.ndarray, positive: np.ndarray) -> float:
    """score, positive: [N] -> the threshold of the best F1 = 2 TP / (predicted + P) over cuts between distinct
    scores."""
    total = int(positive.sum())
    if total == 0:
        return NO_POSITIVE_THRESHOLD
    order = np.argsort(-score, kind="stable")
    ranked, hits = score[order], np.cumsum(positive[order])
    # A cut after rank k predicts the k + 1 highest scores; only the last rank of a run of equal scores is a cut.
    cuts = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    f1 = 2 * hits[cuts] / (cuts + 1 + total)
    return float(ranked[cuts[np.argmax(f1)]])
