"""The layers of COMIC's models beyond the feature extractor:

- Eq. 7: the moving vector e, read as TDE's running sum of batch-mean features (the paper says "gradient"; the
  released code and TDE use features, and only e's direction is ever used);
- Eq. 8: additive attention of the balanced features over the (detached) head / tail features;
- Eq. 9: the normalized multi-group classifier z = (rho / N_g) sum_k w_k f_k / ((||w_k|| + eta) ||f_k||);
- Eq. 10: head / tail logits with e's projection removed / added (coefficients 1 and alpha_tde, released code).

No layer reads a tensor value on the host, so `forward` can be compiled or captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comic.config import ModelConfig


class MovingVector(nn.Module):
    """Eq. 7: e <- mu * e + mean_batch(f), once per training forward (TDE's feature form), frozen in eval.

    `e` is a buffer, so it is saved with the model's state dict and moves with it between devices.
    """

    def __init__(self, dim: int, mu: float) -> None:
        super().__init__()
        self.mu = mu
        self.register_buffer("e", torch.zeros(dim))

    def forward(self, features: Tensor) -> Tensor:
        """features: [B, d] -> e: [d] (updated first in training, as the released code does before the logits)."""
        if self.training:
            self.e.mul_(self.mu).add_(features.detach().float().mean(0))
        return self.e


class NormalizedClassifier(nn.Module):
    """Eq. 9 (and Eq. 10 when e is given): TDE's causal-norm classifier with N_g groups, no bias.

    z_c = (rho / N_g) sum_k w~_ck . f^_k with f^_k = f_k / ||f_k||, w~_ck = w_ck / (||w_ck|| + eta).
    z^_c = (rho / N_g) sum_k w~_ck . (f^_k + shift * cos(f_k, e_k) e^_k): shift = -1 gives the head logits
    (e's projection removed), shift = +alpha_tde the tail logits.
    """

    def __init__(self, feat_dim: int, num_classes: int, rho: float, eta: float, groups: int) -> None:
        super().__init__()
        if feat_dim % groups:
            raise ValueError(f"model.feat_dim={feat_dim} must be divisible by model.groups={groups}")
        self.rho, self.eta, self.groups = rho, eta, groups
        bound = 1 / math.sqrt(feat_dim)
        self.weight = nn.Parameter(torch.empty(num_classes, feat_dim).uniform_(-bound, bound))

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.groups, -1))

    def forward(self, features: Tensor, e: Tensor | None = None, shift: float = 0.0) -> tuple[Tensor, Tensor]:
        """features: [B, d]; e: [d] or None -> (z, z_hat), both [B, C] (z_hat = z without e)."""
        f_hat = F.normalize(self._split(features), dim=-1)  # [B, G, d/G]
        w = self._split(self.weight)  # [C, G, d/G]
        w_tilde = w / (w.norm(dim=-1, keepdim=True) + self.eta)
        scale = self.rho / self.groups
        z = scale * torch.einsum("bgk,cgk->bc", f_hat, w_tilde)
        if e is None:
            return z, z
        e_hat = F.normalize(self._split(e.to(f_hat.dtype)), dim=-1)  # [G, d/G]; e = 0 gives e_hat = 0, z_hat = z
        cos = torch.einsum("bgk,gk->bg", f_hat, e_hat)
        w_on_e = torch.einsum("cgk,gk->cg", w_tilde, e_hat)
        return z, z + (shift * scale) * cos @ w_on_e.T


class LinearClassifier(nn.Module):
    """NC off: a plain linear classifier; Eq. 10 then shifts the raw feature, z^ = W (f + shift (f . e^) e^) + b."""

    def __init__(self, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(feat_dim, num_classes)

    def forward(self, features: Tensor, e: Tensor | None = None, shift: float = 0.0) -> tuple[Tensor, Tensor]:
        """features: [B, d]; e: [d] or None -> (z, z_hat), both [B, C]."""
        z = self.fc(features)
        if e is None:
            return z, z
        e_hat = F.normalize(e.to(features.dtype), dim=0)
        return z, z + shift * (features @ e_hat)[:, None] * (self.fc.weight @ e_hat)[None, :]


class AdditiveAttention(nn.Module):
    """Eq. 8's Attn (Bahdanau): s_j = w_v^T tanh(W_q q + W_k k_j); a = dropout(softmax_j s); out = sum_j a_j k_j.

    Bias-free projections and no value projection, as in the released code.
    """

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.w_v = nn.Linear(dim, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """query: [B, d]; keys (= values): [B, J, d] -> [B, d]."""
        scores = self.w_v(torch.tanh(self.w_q(query)[:, None] + self.w_k(keys))).squeeze(-1)  # [B, J]
        weights = self.dropout(scores.softmax(dim=-1))
        return torch.einsum("bj,bjd->bd", weights, keys)


def build_classifier(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.normalized_classifier:
        return NormalizedClassifier(cfg.feat_dim, num_classes, cfg.rho, cfg.eta, cfg.groups)
    return LinearClassifier(cfg.feat_dim, num_classes)


