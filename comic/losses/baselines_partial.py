"""Partial-label baselines of Table 1: SPLC (Zhang et al., 2021, same paper as Hill), Pseudo-Label (Lee, ICML-W
2013, adapted to missing labels) and P-ASL, the selective mode of the class-aware selective loss (Ben-Baruch et al.,
2021, "Multi-label Classification with Partial Annotations using Class-aware Selective Loss").

Targets are the observed 0/1
labels: in PLT-MLC a 0 is "negative or missing positive". Corrected targets are computed without gradient and only
inside the loss; nothing is written back to the data. Epoch-dependent losses learn the epoch from
`start_epoch(epoch)` (0-based), which writes a buffer, so `forward` never branches on the epoch on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from comic.losses.baselines import ElementwiseLoss, as_fp32, focal_negative, focal_positive, shifted_negative

__all__ = ["SPLC", "PartialASL", "PseudoLabel"]


class SPLC(ElementwiseLoss):
    """Self-paced loss correction, online per batch.

    Observed positives: focal-margin term on z - margin. Observed zeros: focal negative term on z, except that from
    epoch `change_epoch` on (0-based, default 1 = the second epoch) an entry with sigmoid(z) > tau is treated as a
    positive with the *unshifted* logit. Focal gamma on both signs; the focal factor keeps its gradient as in the
    reference. Defaults tau=0.6, change_epoch=1, margin=1, gamma=2, sum.
    """

    corrects_labels = True

    def __init__(self, *, tau: float = 0.6, change_epoch: int = 1, margin: float = 1.0, gamma: float = 2.0,
                 detach_focus: bool = False, reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.tau, self.change_epoch, self.margin, self.gamma, self.detach_focus = (
            tau, change_epoch, margin, gamma, detach_focus)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long), persistent=False)

    def start_epoch(self, epoch: int) -> None:
        """Set the 0-based epoch; correction is on while epoch >= change_epoch."""
        self.epoch.fill_(epoch)

    def corrected_targets(self, logits: Tensor, targets: Tensor) -> Tensor:
        """[B, C] -> [B, C] targets with the confident observed zeros set to 1 (when active); no gradient."""
        with torch.no_grad():
            flip = (self.epoch >= self.change_epoch) & (targets < 0.5) & (torch.sigmoid(logits) > self.tau)
            return torch.where(flip, torch.ones_like(targets), targets)

    def trained_targets(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.corrected_targets(logits, targets)

    def entries(self, logits: Tensor, targets: Tensor) -> Tensor:
        corrected = self.corrected_targets(logits, targets)
        # The margin applies to the observed positives only; corrected entries keep their raw logit.
        positive = focal_positive(logits - self.margin * targets, self.gamma, self.detach_focus)
        negative = focal_negative(logits, self.gamma, self.detach_focus)
        return corrected * positive + (1 - corrected) * negative


class PseudoLabel(ElementwiseLoss):
    """Pseudo-Label for missing labels (no reference code exists, so this adaptation is a design choice).

    BCE in which every observed zero whose predicted probability is >= tau gets the soft target a(t) instead of 0;
    observed positives stay 1. a(t) is Lee's ramp over 0-based epochs: 0 before `ramp_start`, final_weight *
    (t - ramp_start) / (ramp_end - ramp_start) in between, final_weight from `ramp_end` on. So the first epochs are
    plain BCE ("assume negative" warm-up) and confident zeros then move smoothly from negative to positive, with no
    jump in the loss. final_weight <= 1 (a target, unlike Lee's weight 3). Defaults tau=0.9 (conservative: a global
    threshold over-corrects head classes), ramp_start=1, ramp_end=5, final_weight=1, sum.
    Confidence comes from the logits themselves, or from `teacher_logits` (e.g. an EMA model) when given.
    """

    corrects_labels = True

    def __init__(self, *, tau: float = 0.9, ramp_start: int = 1, ramp_end: int = 5, final_weight: float = 1.0,
                 reduction: str = "sum") -> None:
        super().__init__(reduction)
        if not 0.0 <= final_weight <= 1.0:
            raise ValueError(f"final_weight {final_weight!r}: must be in [0, 1] (it is a soft target)")
        if ramp_end < ramp_start:
            raise ValueError(f"ramp_end {ramp_end} < ramp_start {ramp_start}")
        self.tau, self.ramp_start, self.ramp_end, self.final_weight = tau, ramp_start, ramp_end, final_weight
        self.register_buffer("pseudo_target", torch.zeros(()), persistent=False)

    def ramp(self, epoch: int) -> float:
        """a(epoch), the soft target given to confident observed zeros."""
        if epoch >= self.ramp_end:
            return self.final_weight
        if epoch < self.ramp_start:
            return 0.0
        return self.final_weight * (epoch - self.ramp_start) / (self.ramp_end - self.ramp_start)

    def start_epoch(self, epoch: int) -> None:
        """Set the 0-based epoch (writes a(epoch) into a buffer)."""
        self.pseudo_target.fill_(self.ramp(epoch))

    def pseudo_targets(self, confidence_logits: Tensor, targets: Tensor) -> Tensor:
        """[B, C] -> [B, C] soft targets: a(t) on observed zeros with sigmoid(confidence_logits) >= tau; no gradient."""
        with torch.no_grad():
            confident = (targets < 0.5) & (torch.sigmoid(confidence_logits) >= self.tau)
            return torch.where(confident, self.pseudo_target.to(targets.dtype).expand_as(targets), targets)

    def trained_targets(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Soft targets made hard: a correction counts once its target is at least 0.5."""
        return (self.pseudo_targets(logits, targets) >= 0.5).to(targets.dtype)

    def forward(self, logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None) -> Tensor:
        """logits, targets, teacher_logits (optional): [B, C] -> []."""
        logits, targets = as_fp32(logits, targets)
        confidence = logits if teacher_logits is None else as_fp32(teacher_logits, targets)[0]
        soft = self.pseudo_targets(confidence, targets)
        return self.reduce(F.binary_cross_entropy_with_logits(logits, soft, reduction="none"))

    def entries(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, self.pseudo_targets(logits, targets), reduction="none")


class PartialASL(ElementwiseLoss):
    """P-ASL: the class-aware selective loss in `selective` mode.

    PLT-MLC has no observed negatives, so every observed 0 is an *un-annotated* entry (CSL's -1); CSL's
    annotated-negative term (gamma_neg) therefore never applies and is left out. Entries:
      positive      -alpha_pos (1 - p)^gamma_pos log p
      un-annotated  -alpha_unann p_m^gamma_unann log(1 - p_m) * keep,  p_m = max(p - clip, 0)
    keep = 0 (ignored) for (1) every un-annotated entry of a class with class_prior > prior_threshold and (2) the
    K = int(likelihood_topk * B) un-annotated entries of the batch with the highest p (ranked over all of them,
    flattened); keep = 1 otherwise. Focusing weights are constants, as in CSL.

    class_prior: [C] or None (no prior rule). Documented choice: pass observed frequencies n_i / N
    (`prior_from_counts`). CSL's alternative, the mean prediction of a model trained in `ignore` mode, is degenerate
    here: with no annotated negatives that model only ever sees positives. A prior estimated some other way can be
    passed in. Observed frequencies underestimate the true prior by the missing rate, so with prior_threshold=0.5
    (README recipe) only classes observed in over half the images are ignored. Defaults: the README RPS recipe
    (gamma_pos=0, gamma_unann=4, likelihood_topk=5, prior_threshold=0.5) with clip=0 (argparse default), sum.
    """

    def __init__(self, *, class_prior: Tensor | None = None, prior_threshold: float = 0.5,
                 likelihood_topk: float = 5.0, gamma_pos: float = 0.0, gamma_unann: float = 4.0, clip: float = 0.0,
                 alpha_pos: float = 1.0, alpha_unann: float = 1.0, reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.prior_threshold, self.likelihood_topk, self.clip = prior_threshold, likelihood_topk, clip
        self.gamma_pos, self.gamma_unann = gamma_pos, gamma_unann
        self.alpha_pos, self.alpha_unann = alpha_pos, alpha_unann
        prior = None if class_prior is None else torch.as_tensor(class_prior, dtype=torch.float32)
        self.register_buffer("class_prior", prior)

    @staticmethod
    def prior_from_counts(class_counts: Tensor, num_images: int) -> Tensor:
        """Observed class frequencies n_i / N: [C] -> [C] float32."""
        return torch.as_tensor(class_counts, dtype=torch.float32) / num_images

    def kept_unannotated(self, logits: Tensor, targets: Tensor) -> Tensor:
        """[B, C] -> [B, C] 1 where an un-annotated entry counts as a negative, 0 elsewhere; no gradient."""
        with torch.no_grad():
            keep = 1 - targets
            if self.class_prior is not None:
                keep = keep * (self.class_prior <= self.prior_threshold).to(keep.dtype)
            k = min(int(self.likelihood_topk * logits.shape[0]), logits.numel())
            if k > 0:
                # Positives score -1 (below any probability) so they never crowd un-annotated entries out of the top K.
                score = torch.where(targets > 0.5, -torch.ones_like(logits), torch.sigmoid(logits)).flatten()
                likely = torch.zeros_like(score).scatter_(0, score.topk(k).indices, 1.0)
                keep = keep * (1 - likely.view_as(keep))
            return keep

    def entries(self, logits: Tensor, targets: Tensor) -> Tensor:
        positive = self.alpha_pos * focal_positive(logits, self.gamma_pos, detach=True)
        shifted, log_not_shifted = shifted_negative(logits, self.clip)
        unannotated = -self.alpha_unann * shifted.pow(self.gamma_unann).detach() * log_not_shifted
        return targets * positive + self.kept_unannotated(logits, targets) * unannotated
