"""LWS, learnable weight scaling (Kang et al., ICLR 2020 "Decoupling"), adapted to multi-label.

Stage 1 (epochs before `stage2_start`): the baseline network trains as usual (BCE, random sampling). Stage 2: the
network is frozen (parameters and BatchNorm statistics) and only one scale per class is learned,
logit_c = f_c * (w_c . x + b_c) with f initialised to 1 (the reference scales the whole logit, bias included); the
trainer switches to class-aware sampling for these epochs (the method's hooks).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from comic.config import ModelConfig, OptimConfig
from comic.models.baseline import BaselineNet, BaselineOutput


class LWSNet(nn.Module):
    """BaselineNet with a per-class logit scale that trains only in stage 2."""

    def __init__(self, cfg: ModelConfig, num_classes: int, stage2_start: int, scale_lr: float,
                 width: int | None = None) -> None:
        super().__init__()
        self.base = BaselineNet(cfg, num_classes, width)
        self.scale = nn.Parameter(torch.ones(num_classes), requires_grad=False)
        self.stage2_start, self.scale_lr = stage2_start, scale_lr
        self.stage2 = False

    def start_epoch(self, epoch: int) -> None:
        """Called by the trainer before each 1-based epoch: from `stage2_start` on, freeze the net, train f."""
        self.stage2 = epoch >= self.stage2_start
        self.base.requires_grad_(not self.stage2)
        self.scale.requires_grad_(self.stage2)

    def train(self, mode: bool = True) -> LWSNet:
        super().train(mode)
        if self.stage2:
            self.base.eval()  # stage 2 keeps BatchNorm statistics frozen too
        return self

    def forward(self, inputs: Tensor) -> BaselineOutput:
        """inputs: images [B, 3, H, W] or trunk features [B, width] -> BaselineOutput(f * base logits [B, C])."""
        return BaselineOutput(self.base(inputs).logits * self.scale)

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """The base network's groups, and 'baseline/scale' (no weight decay: f is a per-class gain, not a weight).

        The base groups are listed even when frozen: Adam skips parameters without gradients, so one optimizer
        serves both stages.
        """
        groups = self.base.param_groups(optim)
        huge = 10**9  # the scale's LR does not decay within the short stage 2
        return groups + [{"params": [self.scale], "lr": self.scale_lr, "weight_decay": 0.0, "name": "baseline/scale",
                          "model": "baseline", "module": "scale", "step_size": huge}]
