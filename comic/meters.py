"""On-device accumulators for the training loop.

The training step must be capturable (no host synchronisation), so loss terms, non-finite flags and label-correction
tallies accumulate on the device and are read once per logging interval or epoch.
"""

from __future__ import annotations

import numpy as np
import torch

from comic.metrics import correction_counts, correction_metrics


class LossMeter:
    """Running sums of the total loss and its parts, plus the first step whose loss was not finite."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] | None = None
        self.sums: torch.Tensor | None = None
        self.steps = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_values: torch.Tensor | None = None

    def add(self, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """total: [] loss; parts: name -> [] loss term (non-scalar entries are ignored here)."""
        if self.names is None:
            self.names = ["loss"] + [k for k, v in parts.items() if v.dim() == 0]
            self.sums = torch.zeros(len(self.names), device=self.device)
            self.bad_values = torch.zeros(len(self.names), device=self.device)
        values = torch.stack([total.detach().float()] + [parts[k].detach().float() for k in self.names[1:]])
        bad = ~torch.isfinite(values).all()
        first = bad & (self.first_bad < 0)
        self.first_bad = torch.where(first, self.steps, self.first_bad)
        self.bad_values = torch.where(first, values, self.bad_values)
        self.sums += torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        self.steps += 1

    def check_finite(self, epoch: int) -> None:
        """Raise FloatingPointError naming the epoch, step and loss terms of the first non-finite loss (one sync)."""
        step = int(self.first_bad.item())
        if step >= 0:
            terms = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.names or [], self.bad_values.tolist(), strict=True))
            raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {step}: {terms}")

    def means(self) -> dict[str, float]:
        if self.names is None:
            return {}
        steps = max(int(self.steps.item()), 1)
        return {("train/loss" if n == "loss" else f"train/loss_{n}"): v / steps
                for n, v in zip(self.names, self.sums.tolist(), strict=True)}


class CorrectionMeter:
    """Per-class RLC correction tallies over an epoch ([C, 3]: true corrections, corrections, missing positives)."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.counts = torch.zeros(num_classes, 3, dtype=torch.long, device=device)

    def add(self, corrected: torch.Tensor, observed: torch.Tensor, full: torch.Tensor) -> None:
        """corrected, observed, full: [B, C] 0/1."""
        self.counts += correction_counts(corrected, observed, full)

    def per_class(self) -> dict[str, np.ndarray]:
        counts = self.counts.cpu().numpy()
        return {"tp": counts[:, 0], "fp": counts[:, 1] - counts[:, 0], "missing": counts[:, 2]}

    def summary(self, groups: np.ndarray) -> dict[str, float]:
        """Overall and per-shot-group precision and recall of the corrections (one host read)."""
        return correction_metrics(self.counts, groups)
