"""Reflective Label Corrector (Eqs. 2-3), in the released code's form.

Per call, for logits z [B, C] and observed labels y:
  z' = z - m y (margin on observed positives),  p = sigmoid(z'),  P_c = mean_b p[:, c] (or a running mean),
  y^ = y OR (p > max(tau, P_c))  (Eq. 2; corrections carry no gradient),
  D_t = static counts + this epoch's corrections (reset by `start_epoch`),  w'_c = (1 - ln(D_t,c / max D_t))^(1/6),
  L = B_s / N * focal_sum(z', y^, weight w', gamma+ = gamma_pos, gamma- = gamma_neg + w')  (Eq. 3 with MFM's form).
Paper/code disagreements as options: `rlc.class_mean` (batch = code, running = paper's "past data"),
`rlc.normalizer` (positives: N = positives after correction, code; corrected: N = number of corrections, paper),
`rlc.margin` (code only; 0 = paper), `rlc.distribution` (static disables D_t, Table 5).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from comic.config import MFMConfig, RLCConfig
from comic.losses.mfm import focal_sum, head_tail_factor, upcast


class RLCLoss(nn.Module):
    """Label correction plus the MFM-form loss on the corrected targets. class_counts: [C] static distribution D."""

    def __init__(self, class_counts: Tensor, tau: float = 0.7, margin: float = 1.0, distribution: str = "dynamic",
                 class_mean: str = "batch", normalizer: str = "positives", exponent: float = 1 / 6,
                 start_epoch: int = 1, gamma_pos: float = 0.0, gamma_neg: float = 3.0, clip: float = 0.05) -> None:
        super().__init__()
        self.tau, self.margin, self.exponent = tau, margin, exponent
        self.dynamic, self.running_mean = distribution == "dynamic", class_mean == "running"
        self.by_corrections, self.first_epoch = normalizer == "corrected", start_epoch
        self.gamma_pos, self.gamma_neg, self.clip = gamma_pos, gamma_neg, clip
        counts = class_counts.float()
        self.register_buffer("static_counts", counts.clone())
        self.register_buffer("dynamic_counts", counts.clone())  # D_t
        self.register_buffer("prob_sum", torch.zeros_like(counts))  # running P_c: sum of p over the epoch
        self.register_buffer("seen", torch.zeros(()))
        # A tensor flag, not a Python branch on the epoch: the compiled step is not re-traced when correction starts.
        self.register_buffer("active", torch.tensor(float(start_epoch <= 1)))

    @classmethod
    def from_config(cls, cfg: RLCConfig, mfm: MFMConfig, class_counts: Tensor) -> RLCLoss:
        """RLC's own constants from `rlc.*`; its focal exponents and clip are MFM's (`mfm.gamma_*`, `mfm.clip`)."""
        return cls(class_counts, cfg.tau, cfg.margin, cfg.distribution, cfg.class_mean, cfg.normalizer, cfg.exponent,
                   cfg.start_epoch, mfm.gamma_pos, mfm.gamma_neg, mfm.clip)

    def start_epoch(self, epoch: int) -> None:
        """Reset D_t to the static counts and the running P_c; corrections are on from `rlc.start_epoch` (1-based)."""
        self.dynamic_counts.copy_(self.static_counts)
        self.prob_sum.zero_()
        self.seen.zero_()
        self.active.fill_(float(epoch >= self.first_epoch))

    def corrections(self, probs: Tensor, observed: Tensor) -> Tensor:
        """Eq. 2: 1 where y = 0 and p > max(tau, P_c). probs, observed: [B, C] -> [B, C] 0/1 (updates running P_c)."""
        prob_sum, seen = probs.sum(0), probs.shape[0]
        if self.running_mean:
            prob_sum, seen = prob_sum + self.prob_sum, seen + self.seen
            if self.training:
                self.prob_sum.copy_(prob_sum)
                self.seen.copy_(seen)
        threshold = (prob_sum / seen).clamp_min(self.tau)
        return ((probs > threshold) & (observed == 0)).to(probs.dtype) * self.active

    def forward(self, logits: Tensor, observed: Tensor) -> tuple[Tensor, Tensor]:
        """logits, observed: [B, C] -> (loss [], corrected targets [B, C], detached)."""
        z = upcast(logits)
        y = observed.to(z.dtype)
        z = z - self.margin * y  # focal margin on observed positives (released code / SPLC)
        with torch.no_grad():  # corrected targets and the class weights are constants
            new = self.corrections(torch.sigmoid(z), y)
            if self.training:
                self.dynamic_counts += new.sum(0).to(self.dynamic_counts.dtype)
            weight = head_tail_factor(self.dynamic_counts if self.dynamic else self.static_counts, self.exponent)
            target = y + new  # y and new never overlap: an observed positive stays 1
            count = new.sum() if self.by_corrections else target.sum()
        loss = focal_sum(z, target, weight, self.gamma_pos, self.gamma_neg + weight, self.clip)
        return loss * (z.shape[0] / count.clamp_min(1)), target
