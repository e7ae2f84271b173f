"""Plain baseline losses of Table 1: BCE, Focal (Lin et al., ICCV 2017), ASL (Ridnik et al., ICCV 2021) and Hill
(Zhang et al., 2021, "Simple and Robust Loss Design for Multi-Label Learning with Missing Labels").

Formulas and defaults follow each method's reference code. Also owns the pieces the other baseline families share:
the fp32 / shape / reduction base class `ElementwiseLoss` and the focal and shifted-negative terms.

Every loss is called as `loss(logits [B, C], targets [B, C])` -> [] with targets 0/1 (an unobserved positive is a 0,
i.e. "assume negative"). Reductions: 'sum' over all B*C entries (the ASL / Hill / CSL / COMIC convention) or 'mean'
= sum / (B*C) (the DB / ML-GCN convention). Losses run in fp32 whatever the logits' dtype, never edit their inputs,
and never read tensor values on the host, so a training step that calls them stays capturable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ASL", "BCE", "REDUCTIONS", "ElementwiseLoss", "Focal", "Hill", "as_fp32", "focal_negative",
           "focal_positive", "shifted_negative"]

REDUCTIONS = ("sum", "mean")
_LOG_EPS = 1e-8  # ASL/CSL clamp before log of a shifted probability (reference code); only reached when clip < 1e-8


def focal_positive(logits: Tensor, gamma: float, detach: bool = False) -> Tensor:
    """-(1 - p)^gamma log p for p = sigmoid(logits): [B, C] -> [B, C]; log p via logsigmoid (finite for any logit)."""
    weight = torch.sigmoid(-logits).pow(gamma)  # 1 - p without the cancellation of 1 - sigmoid(z)
    if detach:
        weight = weight.detach()
    return -weight * F.logsigmoid(logits)


def focal_negative(logits: Tensor, gamma: float, detach: bool = False) -> Tensor:
    """-p^gamma log(1 - p) for p = sigmoid(logits): [B, C] -> [B, C]."""
    weight = torch.sigmoid(logits).pow(gamma)
    if detach:
        weight = weight.detach()
    return -weight * F.logsigmoid(-logits)


def shifted_negative(logits: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """ASL probability shifting: (p_m, log(1 - p_m)) with p_m = max(p - clip, 0), both [B, C].

    A negative with p < clip has p_m = 0 and log(1 - p_m) = log 1 = 0 exactly, hence zero loss and zero gradient.
    With clip = 0 the log comes from logsigmoid, so it stays exact for confident negatives.
    """
    if clip <= 0:
        return torch.sigmoid(logits), F.logsigmoid(-logits)
    shifted = (torch.sigmoid(logits) - clip).clamp(min=0)
    return shifted, torch.log((1 - shifted).clamp(min=_LOG_EPS))


class ElementwiseLoss(nn.Module):
    """Base class: a subclass defines `entries(logits, targets) -> [B, C]`; `forward` validates, upcasts, reduces.

    Losses that correct labels set `corrects_labels` and override `trained_targets`; epoch-dependent losses override
    `start_epoch` (0-based epochs).
    """

    corrects_labels = False

    def __init__(self, reduction: str) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction {reduction!r}: must be one of {REDUCTIONS}")
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """logits: [B, C] any float dtype; targets: [B, C] 0/1 (any dtype) -> [] fp32."""
        logits, targets = as_fp32(logits, targets)
        return self.reduce(self.entries(logits, targets))

    def entries(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-entry loss, logits and targets fp32 [B, C] -> [B, C]."""
        raise NotImplementedError

    def reduce(self, entries: Tensor) -> Tensor:
        """[B, C] -> []: sum over all entries, or that sum / (B*C) for 'mean'."""
        return entries.sum() if self.reduction == "sum" else entries.mean()

    def start_epoch(self, epoch: int) -> None:
        """Before each 0-based epoch; the losses without epoch-dependent state ignore it."""

    def trained_targets(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The hard 0/1 targets [B, C] this loss trains on for these logits (the observed ones unless it corrects)."""
        return targets


def as_fp32(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Check [B, C] shapes; return fp32 logits and targets (new tensors unless already fp32, never written to)."""
    if logits.dim() != 2 or targets.shape != logits.shape:
        shapes = f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"logits and targets must both be [B, C]; got {shapes}")
    return logits.float(), targets.float()


class BCE(ElementwiseLoss):
    """Binary cross-entropy from logits, "assume negative" for unobserved entries (the paper's ERM baseline).

    Entry: -[y log p + (1 - y) log(1 - p)]. Default reduction 'sum', as the ASL / Hill / CSL / COMIC family.
    """

    def __init__(self, *, reduction: str = "sum") -> None:
        super().__init__(reduction)

    def entries(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


class Focal(ElementwiseLoss):
    """Focal loss: entry -alpha_t (1 - p_t)^gamma log p_t.

    alpha=None (default) is the multi-label form of the Hill repo: symmetric focusing, no class-sign weight. A float
    alpha is Lin et al.'s alpha_t (alpha for positives, 1 - alpha for negatives). The DB / COMIC repos' scalar
    multiplier 0.25 only rescales the loss, so it is left out. As in the references the focusing factor keeps its
    gradient unless `detach_focus=True`. With gamma = 0 and alpha = None this is exactly BCE.
    """

    def __init__(self, *, gamma: float = 2.0, alpha: float | None = None, detach_focus: bool = False,
                 reduction: str = "sum") -> None:
        super().__init__(reduction)
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha {alpha!r}: must be in [0, 1] or None")
        self.gamma, self.alpha, self.detach_focus = gamma, alpha, detach_focus

    def entries(self, logits: Tensor, targets: Tensor) -> Tensor:
        positive = focal_positive(logits, self.gamma, self.detach_focus)
        negative = focal_negative(logits, self.gamma, self.detach_focus)
        if self.alpha is not None:
            positive, negative = self.alpha * positive, (1 - self.alpha) * negative
        return targets * positive + (1 - targets) * negative


class ASL(ElementwiseLoss):
    """Asymmetric loss: positives -(1 - p)^gamma_pos log p; negatives -p_m^gamma_neg log(1 - p_m),
    p_m = max(p - clip, 0).

    Defaults are the reference `train.py` values (gamma_neg=4, gamma_pos=0, clip=0.05, sum). The focusing weights are
    constants (`detach_focus=True`, the reference's `disable_torch_grad_focal_loss`), done with `.detach()`.
    Negatives with p < clip give exactly zero loss.
    """

    def __init__(self, *, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 detach_focus: bool = True, reduction: str = "sum") -> None:
        super().__init__(reduction)
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"clip {clip!r}: must be in [0, 1)")
        self.gamma_neg, self.gamma_pos, self.clip, self.detach_focus = gamma_neg, gamma_pos, clip, detach_focus

    def entries(self, logits: Tensor, targets: Tensor) -> Tensor:
        positive = focal_positive(logits, self.gamma_pos, self.detach_focus)
        shifted, log_not_shifted = shifted_negative(logits, self.clip)
        weight = shifted.pow(self.gamma_neg)
        if self.detach_focus:
            weight = weight.detach()
        return targets * positive - (1 - targets) * weight * log_not_shifted


class Hill(ElementwiseLoss):
    """Hill loss: positives focal-margin -(1 - p_m)^gamma log p_m with p_m = sigmoid(z - margin);
    negatives (hill_lambda - p) p^2 with p = sigmoid(z), no margin.

    Defaults are the reference class's (hill_lambda=1.5, margin=1.0, gamma=2, sum). The negative term's gradient
    3 p^2 (1 - p)^2 (for lambda = 1.5) vanishes for confident negatives, the likely missing positives. The focal
    factor keeps its gradient as in the reference (`detach_focus=False`).
    """

    def __init__(self, *, hill_lambda: float = 1.5, margin: float = 1.0, gamma: float = 2.0,
                 detach_focus: bool = False, reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.hill_lambda, self.margin, self.gamma, self.detach_focus = hill_lambda, margin, gamma, detach_focus

    def entries(self, logits: Tensor, targets: Tensor) -> Tensor:
        positive = focal_positive(logits - self.margin, self.gamma, self.detach_focus)
        prob = torch.sigmoid(logits)
        negative = (self.hill_lambda - prob) * prob.square()
        return targets * positive + (1 - targets) * negative
