"""Head-Tail Balancer loss (Eq. 11).

  L_htb = kappa_h D(z_h_hat, z_b) + kappa_t D(z_t_hat, z_b),
  kappa_h = L(z_h_hat)^alpha / (L(z_h_hat)^alpha + L(z_t_hat)^alpha),  kappa_t = 1 - kappa_h,
where L is the classification loss (MFM, or BCE under `mfm.enabled=false`) against the observed labels, summed over
the batch, so kappa is one number per batch. kappa and the teachers z_h_hat, z_t_hat are detached: only the balanced
model learns from this term. Distillation D (`htb.variant`):
- `kd` (default): soft-target BCE of sigmoid(z_b) against q = sigmoid(z_x_hat), summed;
- `literal` (released code): L(softmax(z_x_hat) * softmax(z_b), y), the class-softmax product fed to L as a logit.
  Its values are about 1 / C^2, so it is nearly flat; kept for fidelity checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comic.losses.mfm import upcast


class HTBLoss(nn.Module):
    """Eq. 11. `base`: the classification loss module, base(logits [B, C], targets [B, C]) -> [] sum."""

    def __init__(self, base: nn.Module, alpha: float = 2.0, variant: str = "kd") -> None:
        super().__init__()
        if variant not in ("kd", "literal"):
            raise ValueError(f"htb.variant={variant!r}: must be 'kd' or 'literal'")
        self.base, self.alpha, self.variant = base, alpha, variant

    @torch.no_grad()
    def kappa_head(self, z_h_hat: Tensor, z_t_hat: Tensor, targets: Tensor) -> Tensor:
        """kappa_h = A_h^a / (A_h^a + A_t^a) = sigmoid(a (ln A_h - ln A_t)), stable for any loss size; [] tensor."""
        a_h, a_t = self.base(z_h_hat, targets), self.base(z_t_hat, targets)
        tiny = torch.finfo(a_h.dtype).tiny
        return torch.sigmoid(self.alpha * (a_h.clamp_min(tiny).log() - a_t.clamp_min(tiny).log()))

    def distill(self, teacher: Tensor, z_b: Tensor, targets: Tensor) -> Tensor:
        """teacher (detached here), z_b: [B, C] logits -> [] distillation loss of the balanced model."""
        teacher, z_b = upcast(teacher).detach(), upcast(z_b)  # Eq. 11: teachers get no gradient
        if self.variant == "kd":
            return F.binary_cross_entropy_with_logits(z_b, torch.sigmoid(teacher), reduction="sum")
        return self.base(teacher.softmax(dim=1) * z_b.softmax(dim=1), targets)

    def forward(self, z_h_hat: Tensor, z_t_hat: Tensor, z_b: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """z_h_hat, z_t_hat, z_b, targets: [B, C] -> (loss [], kappa_h [])."""
        kappa_h = self.kappa_head(upcast(z_h_hat).detach(), upcast(z_t_hat).detach(), targets)
        loss = kappa_h * self.distill(z_h_hat, z_b, targets) + (1 - kappa_h) * self.distill(z_t_hat, z_b, targets)
        return loss, kappa_h
