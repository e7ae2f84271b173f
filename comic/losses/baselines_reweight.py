"""Distribution-Balanced losses DB and DB-Focal (Wu et al., ECCV 2020, "Distribution-Balanced Loss for Multi-Label
Classification in Long-Tailed Datasets").

Formulas as the reference code computes them, for logits z, targets y, observed
training counts n_i of N images:
  re-balanced weight  r_ki = (1/n_i) / sum_{j in Y_k} 1/n_j,   w_ki = alpha + sigmoid(beta (r_ki - mu))
  class shift         z' = z + s_i,  s_i = -(init_bias / neg_scale) log(N / n_i - 1)
  DB entry            y w softplus(-z') + (1 - y) (w / neg_scale) softplus(neg_scale z')
  DB-Focal entry      balance_param [y w (1 - p')^gamma softplus(-z') + (1 - y) (w / neg_scale) p''^gamma
                      softplus(neg_scale z')],  p' = sigmoid(z'), p'' = sigmoid(neg_scale z')
Defaults are the reference's COCO-MLT config; VOC-MLT uses mu=0.3, neg_scale=5. The shift exists only inside the loss
(evaluation reads the raw logits). Reduction defaults to 'mean' over B*C, as the reference.

Choices where the reference is undefined:
- counts are clamped to [1, N - 1] before use, so a class never observed (n_i = 0) or always observed gets a finite
  weight and shift;
- an image with no observed positive (empty Y_k) gets w = alpha + 1 on every entry: the limit r -> inf that the
  reference reaches through 1/0, made explicit (no inf, no NaN);
- class_counts=None means uniform counts with prior 1/2: w_ki = alpha + sigmoid(beta (1/|Y_k| - mu)) and no shift,
  so `DB()(logits, targets)` works without data statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from comic.losses.baselines import ElementwiseLoss, focal_negative, focal_positive

__all__ = ["DB", "DBFocal", "clamp_counts"]


def clamp_counts(class_counts: Tensor, num_images: int) -> Tensor:
    """Observed positive counts [C] clamped to [1, N - 1] (float64), so 1/n_i and log(N/n_i - 1) are finite."""
    if num_images < 2:
        raise ValueError(f"num_images {num_images!r}: DB needs at least 2 training images")
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1:
        raise ValueError(f"class_counts must be [C], got shape {tuple(counts.shape)}")
    return counts.clamp(1, num_images - 1)


class DB(ElementwiseLoss):
    """DB loss: re-balanced weighting + negative-tolerant regularization (see the module docstring).

    class_counts: [C] observed positive training images per class, with num_images = N; both None (default) =
    uniform counts, prior 1/2. Stored as buffers, so `.to(device)` moves them.
    """

    def __init__(self, *, class_counts: Tensor | None = None, num_images: int | None = None, alpha: float = 0.1,
                 beta: float = 10.0, mu: float = 0.2, neg_scale: float = 2.0, init_bias: float = 0.05,
                 reduction: str = "mean") -> None:
        super().__init__(reduction)
        if neg_scale <= 0:
            raise ValueError(f"neg_scale {neg_scale!r}: must be > 0")
        self.alpha, self.beta, self.mu, self.neg_scale = alpha, beta, mu, neg_scale
        self.focal_gamma, self.balance_param = 0.0, 1.0  # DB-Focal overrides these
        if (class_counts is None) != (num_images is None):
            raise ValueError("give class_counts and num_images together (or neither, for uniform counts)")
        inverse_counts = shift = None
        if class_counts is not None:
            counts = clamp_counts(class_counts, num_images)
            inverse_counts = (1 / counts).float()
            shift = (-(init_bias / neg_scale) * torch.log(num_images / counts - 1)).float()
        self.register_buffer("inverse_counts", inverse_counts)
        self.register_buffer("logit_shift", shift)

    def rebalance_weights(self, targets: Tensor) -> Tensor:
        """w_ki = alpha + sigmoid(beta (r_ki - mu)): targets [B, C] -> [B, C], no gradient (labels and counts only)."""
        with torch.no_grad():
            inverse = targets.new_ones(targets.shape[1])
            if self.inverse_counts is not None:
                inverse = self.inverse_counts.to(targets.dtype)
            denominator = targets @ inverse  # [B]: sum over the image's observed positives of 1/n_j
            ratio = inverse / denominator.clamp_min(1e-12).unsqueeze(1)
            weight = self.alpha + torch.sigmoid(self.beta * (ratio - self.mu))
            # Empty Y_k: the reference's r = x/0 = inf saturates the sigmoid; state that limit instead of computing it.
            return torch.where(denominator.unsqueeze(1) > 0, weight, torch.full_like(weight, self.alpha + 1.0))

    def entries(self, logits: Tensor, targets: Tensor) -> Tensor:
        shifted = logits + self.logit_shift if self.logit_shift is not None else logits
        weight = self.rebalance_weights(targets)
        positive = focal_positive(shifted, self.focal_gamma)
        negative = focal_negative(self.neg_scale * shifted, self.focal_gamma) / self.neg_scale
        return self.balance_param * weight * (targets * positive + (1 - targets) * negative)


class DBFocal(DB):
    """DB-Focal: DB with the focal factor of the *transformed* logit (p_t from z' for positives, from
    neg_scale z' for negatives), times balance_param. Defaults gamma=2, balance_param=2.0 (COCO-MLT config); the
    focal factor keeps its gradient as in the reference. Other arguments as `DB`.
    """

    def __init__(self, *, class_counts: Tensor | None = None, num_images: int | None = None, alpha: float = 0.1,
                 beta: float = 10.0, mu: float = 0.2, neg_scale: float = 2.0, init_bias: float = 0.05,
                 gamma: float = 2.0, balance_param: float = 2.0, reduction: str = "mean") -> None:
        super().__init__(class_counts=class_counts, num_images=num_images, alpha=alpha, beta=beta, mu=mu,
                         neg_scale=neg_scale, init_bias=init_bias, reduction=reduction)
        self.focal_gamma, self.balance_param = gamma, balance_param
