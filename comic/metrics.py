"""Evaluation metrics: per-class AP, mAP per shot group, recall, RLC corrections, and THE shot-group rule.

- AP: non-interpolated, as in the ASL family and the released code: sort by score, average precision@rank over the
  positives' ranks (equals sklearn's `average_precision_score` when scores have no ties). mAP in percent.
- Shot groups from the observed training counts: many >= 100, medium 20-99, few < 20; "average mAP" (Table 2) is
  the mean of the three group mAPs. Classes without a positive in the evaluated set are excluded (and logged).
- Recall: micro recall at threshold 0.5 over all (image, class) pairs (Table 2).
- RLC corrections against the full labels: precision = true corrections / corrections, recall = true corrections /
  missing positives, overall and per shot group, from on-device accumulable counts.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

SHOT_GROUPS = ("many", "medium", "few")
MANY_MIN, FEW_BELOW = 100, 20


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class non-interpolated AP. scores, targets: [N, C] -> [C]; NaN for a class with no positive."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=0, kind="stable")
    hits = np.take_along_axis(np.asarray(targets) > 0, order, axis=0).astype(np.float64)  # [N, C] by rank
    precision_at_rank = np.cumsum(hits, axis=0) / np.arange(1, hits.shape[0] + 1)[:, None]
    positives = hits.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives > 0, (precision_at_rank * hits).sum(axis=0) / positives, np.nan)


def shot_groups(train_counts: np.ndarray) -> np.ndarray:
    """[C] observed training counts -> [C] group names: 'many' (>= 100), 'medium' (20-99), 'few' (< 20)."""
    counts = np.asarray(train_counts)
    return np.where(counts >= MANY_MIN, "many", np.where(counts >= FEW_BELOW, "medium", "few"))


def shot_group_members(train_counts: np.ndarray) -> dict[str, list[int]]:
    """[C] observed training counts -> class indices of each group, {'many': [...], 'medium': [...], 'few': [...]}."""
    groups = shot_groups(train_counts)
    return {name: np.flatnonzero(groups == name).tolist() for name in SHOT_GROUPS}


def evaluate_scores(scores: np.ndarray, targets: np.ndarray, train_counts: np.ndarray) -> dict[str, float]:
    """mAP (percent) overall / per shot group / average of the groups, micro recall at 0.5, excluded classes.

    scores: [N, C] probabilities (AP only needs the ranking; recall thresholds them at 0.5); targets: [N, C] 0/1;
    train_counts: [C]. A group without an evaluable class gets NaN and is left out of 'map_avg'.
    """
    ap = average_precision(scores, targets)
    valid = ~np.isnan(ap)
    if not valid.all():
        log.debug("excluded %d classes with no positive in the evaluated set: %s",
                 int((~valid).sum()), np.flatnonzero(~valid).tolist())
    groups = shot_groups(train_counts)
    out = {"map": _mean_percent(ap[valid])}
    for name in SHOT_GROUPS:
        out[f"map_{name}"] = _mean_percent(ap[valid & (groups == name)])
    group_maps = [out[f"map_{name}"] for name in SHOT_GROUPS if not math.isnan(out[f"map_{name}"])]
    out["map_avg"] = float(np.mean(group_maps)) if group_maps else math.nan
    positives = np.asarray(targets) > 0
    hits = (np.asarray(scores) >= 0.5) & positives
    out["recall"] = 100.0 * hits.sum() / positives.sum() if positives.any() else math.nan
    out["num_excluded_classes"] = float((~valid).sum())
    return out


def chance_map(targets: np.ndarray) -> float:
    """mAP (percent) of the label-frequency baseline: a score that ignores the image ranks images at random, and a
    random ranking's expected AP is the class's prevalence. targets: [N, C]; classes without positives excluded."""
    prevalence = np.asarray(targets, dtype=np.float64).mean(0)
    return _mean_percent(prevalence[prevalence > 0])


def _mean_percent(values: np.ndarray) -> float:
    return float(100.0 * values.mean()) if values.size else math.nan


def correction_counts(corrected: Tensor, observed: Tensor, full: Tensor) -> Tensor:
    """RLC correction tallies per class of one batch, on the batch's device and without a host sync; add over steps.

    corrected, observed, full: [B, C] 0/1. Returns [C, 3] long: columns true corrections, corrections (positives of
    `corrected` absent from `observed`), missing positives (in `full`, not in `observed`).
    """
    new = (corrected > 0.5) & (observed <= 0.5)
    truth = full > 0.5
    return torch.stack([(new & truth).sum(0), new.sum(0), (truth & (observed <= 0.5)).sum(0)], dim=1)


def correction_metrics(counts: Tensor | np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """[C, 3] summed `correction_counts` and [C] shot groups -> 'rlc/precision', 'rlc/recall' overall and per group.

    Precision is NaN without corrections, recall NaN without missing positives. Also 'rlc/corrections', 'rlc/tp'
    and 'rlc/fp' (true and false corrections; the paper's Fig. 5a).
    """
    counts = np.asarray(counts.detach().cpu() if isinstance(counts, Tensor) else counts, dtype=np.float64)
    out: dict[str, float] = {}
    masks = [("", np.ones(len(groups), dtype=bool))] + [(f"_{g}", np.asarray(groups) == g) for g in SHOT_GROUPS]
    for suffix, mask in masks:
        true, made, missing = counts[mask].sum(0)
        out[f"rlc/precision{suffix}"] = true / made if made else math.nan
        out[f"rlc/recall{suffix}"] = true / missing if missing else math.nan
    true, made, _ = counts.sum(0)
    out |= {"rlc/corrections": made, "rlc/tp": true, "rlc/fp": made - true}
    return out
