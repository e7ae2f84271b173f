"""Multi-Focal Modifier loss (Eqs. 5-6) and the plain BCE that replaces it when `mfm.enabled=false`.

Eq. 5-6 in the released code's ASL form, for p = sigmoid(z):
  gamma+_c = gamma_pn+ + w+ gamma_ht_c,  gamma-_c = gamma_pn- + w- gamma_ht_c,  gamma_ht_c = (1 - ln(n_c / n_max))^(1/3)
  L = -sum_{b,c} (1 - p_t)^gamma_c * w_c * [y log p + (1 - y) log min(1, 1 - p + clip)]
The focusing factor is a constant weight (no gradient); the reduction is a sum. Code-only parts, each a config key:
the class weight w_c on both terms (`mfm.class_weight`), the clip (`mfm.clip`, 0 = paper), the exponent 1/3
(`mfm.ht_exponent`) and the co-occurrence prior (`mfm.cooccurrence_prior`, off by default).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comic.config import MFMConfig

PRIOR_NEG_SCALE = 1.2  # released code: negatives of co-occurring classes get p_neg <- min(1, 1.2 p_neg)


def upcast(x: Tensor) -> Tensor:
    """Half-precision tensors to fp32 (losses are computed in fp32); fp32 / fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def head_tail_factor(counts: Tensor, exponent: float) -> Tensor:
    """gamma_ht = (1 - ln(n_c / n_max)) ** exponent: [C] -> [C], 1 for the largest class.

    Counts below 1 are raised to 1: a class never observed would otherwise get an infinite weight.
    """
    n = counts.float().clamp_min(1.0)
    return (1 - torch.log(n / n.max())) ** exponent


def focal_sum(logits: Tensor, targets: Tensor, weight: Tensor | float, gamma_pos: Tensor | float,
              gamma_neg: Tensor | float, clip: float, prior: Tensor | None = None) -> Tensor:
    """-sum (1 - p_t)^gamma * weight * [y log p_pos + (1 - y) log p_neg] over batch and classes (Eq. 6, ASL form).

    logits, targets: [B, C] (soft targets allowed); weight, gamma_pos, gamma_neg: [C] or scalars;
    p_neg = min(1, 1 - p + clip); prior: [B, C] co-occurrence margin a (released code) or None.
    """
    return focal_terms(logits, targets, weight, gamma_pos, gamma_neg, clip, prior).sum()


def focal_terms(logits: Tensor, targets: Tensor, weight: Tensor | float, gamma_pos: Tensor | float,
                gamma_neg: Tensor | float, clip: float, prior: Tensor | None = None) -> Tensor:
    """The [B, C] entries that `focal_sum` adds up."""
    z = upcast(logits)
    y = targets.to(z.dtype)
    log_pos = F.logsigmoid(z)  # exact log p, finite for any logit
    log_neg = torch.log(torch.clamp(torch.sigmoid(-z) + clip, max=1.0)) if clip > 0 else F.logsigmoid(-z)
    if prior is not None:
        log_pos = log_pos + torch.log((1 - prior).clamp_min(1e-8))  # p_pos = p (1 - a)
        log_neg = torch.where(prior > 0, (log_neg + math.log(PRIOR_NEG_SCALE)).clamp(max=0.0), log_neg)
    with torch.no_grad():  # Eq. 6: the focusing factor is a constant weight, as in the released code
        p_t = y * log_pos.exp() + (1 - y) * log_neg.exp()
        gamma = gamma_pos * y + gamma_neg * (1 - y)
        focus = (1 - p_t).clamp_min(0).pow(gamma)
    return -(focus * weight * (y * log_pos + (1 - y) * log_neg))


def cooccurrence_margin(targets: Tensor, cooc_norm: Tensor) -> Tensor:
    """Released-code prior a_k = normalised mean of the column-normalised co-occurrence rows of k's positives.

    targets: [B, C]; cooc_norm: [C, C] -> [B, C]. An image without positives gets a = 0 (the code would give NaN).
    """
    y = targets.to(cooc_norm.dtype)
    a = (y @ cooc_norm) / y.sum(1, keepdim=True).clamp_min(1)
    return a / a.sum(1, keepdim=True).clamp_min(1e-12)


class MFMLoss(nn.Module):
    """MFM (Eq. 5-6). class_counts: [C] observed training positives (the static distribution D)."""

    def __init__(self, class_counts: Tensor, gamma_pos: float = 0.0, gamma_neg: float = 3.0, use_pn: bool = True,
                 use_ht: bool = True, class_weight: bool = True, ht_exponent: float = 1 / 3, ht_weight_pos: float = 0.0,
                 ht_weight_neg: float = 1.0, clip: float = 0.05, cooccurrence: Tensor | None = None) -> None:
        super().__init__()
        gamma_ht = head_tail_factor(class_counts, ht_exponent)
        ones = torch.ones_like(gamma_ht)
        pn_pos, pn_neg = (gamma_pos, gamma_neg) if use_pn else (0.0, 0.0)  # Table 4 "H-T only": no P-N factor
        ht = gamma_ht if use_ht else 0 * gamma_ht  # Table 4 "P-N only": no gamma_ht and no w_c
        self.register_buffer("gamma_pos", pn_pos + ht_weight_pos * ht)
        self.register_buffer("gamma_neg", pn_neg + ht_weight_neg * ht)
        self.register_buffer("weight", gamma_ht if use_ht and class_weight else ones)
        self.clip = clip
        cooc = None if cooccurrence is None else cooccurrence.float()
        self.register_buffer("cooc_norm", None if cooc is None else cooc / cooc.sum(0, keepdim=True).clamp_min(1))

    @classmethod
    def from_config(cls, cfg: MFMConfig, class_counts: Tensor, cooccurrence: Tensor | None = None) -> MFMLoss:
        if cfg.cooccurrence_prior and cooccurrence is None:
            raise ValueError("mfm.cooccurrence_prior=true needs the [C, C] co-occurrence counts of the observed "
                             "training labels (pass cooccurrence= to the criterion)")
        return cls(class_counts, cfg.gamma_pos, cfg.gamma_neg, cfg.use_pn, cfg.use_ht, cfg.class_weight,
                   cfg.ht_exponent, cfg.ht_weight_pos, cfg.ht_weight_neg, cfg.clip,
                   cooccurrence if cfg.cooccurrence_prior else None)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """logits, targets: [B, C] -> [] summed loss."""
        return self.entries(logits, targets).sum()

    def entries(self, logits: Tensor, targets: Tensor) -> Tensor:
        """logits, targets: [B, C] (soft targets allowed) -> the [B, C] loss entries."""
        prior = None if self.cooc_norm is None else cooccurrence_margin(targets, self.cooc_norm)
        return focal_terms(logits, targets, self.weight, self.gamma_pos, self.gamma_neg, self.clip, prior)
