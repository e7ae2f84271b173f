"""Head-Tail Balancer loss (Eq. 11), with the choices the paper leaves open as options.

  L_htb = sum_b kappa_h D_b(z_h_hat, z_b) + kappa_t D_b(z_t_hat, z_b),   kappa_t = 1 - kappa_h,
where D_b is the distillation of image b's logits and kappa weighs the two teachers. kappa and the teachers z_h_hat,
z_t_hat are detached: only the balanced model learns from this term.

kappa (`htb.kappa`), with A the classification loss L (MFM, or BCE under `mfm.enabled=false`) on the observed labels:
- `paper` (default): kappa_h = A_h^alpha / (A_h^alpha + A_t^alpha), A summed over the batch: one number per batch,
  the larger weight on the teacher with the higher loss;
- `inverse`: kappa_h = A_t^alpha / (A_h^alpha + A_t^alpha), the larger weight on the teacher with the lower loss;
- `per-sample`: the paper's rule per image (A per image), as in xERM where the rule comes from;
- `head` / `tail`: one teacher only (kappa_h = 1 / 0).
D (`htb.variant`):
- `kd` (default): soft-target BCE of sigmoid(z_b) against q = sigmoid(z_x_hat), over all classes;
- `mfm`: the soft targets q through the classification loss L itself (its focusing factors and clip), so the
  distillation weighs entries as the classification loss does;
- `literal` (released code): L(softmax(z_x_hat) * softmax(z_b), y), the class-softmax product fed to L as a logit.
  Its values are about 1 / C^2, so it is nearly flat; kept for fidelity checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comic.losses.mfm import upcast

KAPPAS = ("paper", "inverse", "per-sample", "head", "tail")
VARIANTS = ("kd", "mfm", "literal")


class HTBLoss(nn.Module):
    """Eq. 11. `base`: the classification loss module, with `entries(logits [B, C], targets [B, C]) -> [B, C]`."""

    def __init__(self, base: nn.Module, alpha: float = 2.0, variant: str = "kd", kappa: str = "paper") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"htb.variant={variant!r}: must be one of {', '.join(VARIANTS)}")
        if kappa not in KAPPAS:
            raise ValueError(f"htb.kappa={kappa!r}: must be one of {', '.join(KAPPAS)}")
        self.base, self.alpha, self.variant, self.kappa_rule = base, alpha, variant, kappa

    @torch.no_grad()
    def kappa_head(self, z_h_hat: Tensor, z_t_hat: Tensor, targets: Tensor) -> Tensor:
        """kappa_h: [] (batch rules) or [B] (`per-sample`); A^a / (A_h^a + A_t^a) as a sigmoid of the log ratio,
        stable for any loss size."""
        if self.kappa_rule in ("head", "tail"):
            return torch.tensor(float(self.kappa_rule == "head"), device=z_h_hat.device)
        per_image = self.kappa_rule == "per-sample"
        a_h, a_t = (self._loss(z, targets, per_image) for z in (z_h_hat, z_t_hat))
        tiny = torch.finfo(a_h.dtype).tiny
        log_ratio = a_h.clamp_min(tiny).log() - a_t.clamp_min(tiny).log()
        sign = -1.0 if self.kappa_rule == "inverse" else 1.0
        return torch.sigmoid(sign * self.alpha * log_ratio)

    def _loss(self, logits: Tensor, targets: Tensor, per_image: bool) -> Tensor:
        entries = self.base.entries(logits, targets.to(logits.dtype))
        return entries.sum(1) if per_image else entries.sum()

    def distill(self, teacher: Tensor, z_b: Tensor, targets: Tensor) -> Tensor:
        """teacher (detached here), z_b: [B, C] logits -> [B] distillation loss of each image (balanced model)."""
        teacher, z_b = upcast(teacher).detach(), upcast(z_b)  # Eq. 11: teachers get no gradient
        if self.variant == "kd":
            return F.binary_cross_entropy_with_logits(z_b, torch.sigmoid(teacher), reduction="none").sum(1)
        if self.variant == "mfm":
            return self.base.entries(z_b, torch.sigmoid(teacher)).sum(1)
        return self.base.entries(teacher.softmax(dim=1) * z_b.softmax(dim=1), targets.to(z_b.dtype)).sum(1)

    def forward(self, z_h_hat: Tensor, z_t_hat: Tensor, z_b: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """z_h_hat, z_t_hat, z_b, targets: [B, C] -> (loss [], mean kappa_h [])."""
        kappa_h = self.kappa_head(upcast(z_h_hat).detach(), upcast(z_t_hat).detach(), targets)
        per_image = kappa_h * self.distill(z_h_hat, z_b, targets) + (1 - kappa_h) * self.distill(z_t_hat, z_b, targets)
        return per_image.sum(), kappa_h.mean()
