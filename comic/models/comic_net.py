"""COMIC's three-model network: head, tail and balanced models side by side on the same images."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from comic.config import ModelConfig, OptimConfig
from comic.models.backbone import FeatureLayer, Trunks, model_param_groups, param_group
from comic.models.layers import AdditiveAttention, MovingVector, build_classifier


class ComicOutput(NamedTuple):
    """All outputs are [B, C] logits. `logits` = z_b is the prediction; the rest are Eq. 9-10's head/tail logits."""

    logits: Tensor
    z_h: Tensor
    z_t: Tensor
    z_h_hat: Tensor
    z_t_hat: Tensor


class Branch(nn.Module):
    """One of COMIC's three models above the trunk: feature layer, classifier and (head / tail) the moving vector e."""

    def __init__(self, cfg: ModelConfig, width: int, num_classes: int, shift: float | None) -> None:
        super().__init__()
        self.features = FeatureLayer(cfg, width)
        self.classifier = build_classifier(cfg, num_classes)
        self.shift = shift or 0.0
        # AMV off (or the balanced model, whose e the released code never uses): z_hat = z.
        self.moving = MovingVector(cfg.feat_dim, cfg.mu) if shift is not None and cfg.moving_vector else None

    def logits(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features: [B, d] -> (z, z_hat): [B, C] each (Eq. 9, Eq. 10)."""
        e = self.moving(features) if self.moving is not None else None
        return self.classifier(features, e, self.shift)


class ComicNet(nn.Module):
    """Head, tail and balanced models side by side on the same inputs; z_b = `logits` is the prediction.

    Their trunks are `Trunks` (one shared frozen trunk, three trainable ones, or none on cached features); evaluation
    runs all three models too, because the balanced features attend over the head / tail features.
    """

    MODELS = ("head", "tail", "balanced")

    def __init__(self, cfg: ModelConfig, num_classes: int, width: int | None = None) -> None:
        super().__init__()
        self.trunks = Trunks(cfg, self.MODELS, width)
        width = self.trunks.width
        self.head = Branch(cfg, width, num_classes, shift=-1.0)  # Eq. 10: subtract e (coefficient 1)
        self.tail = Branch(cfg, width, num_classes, shift=cfg.alpha_tde)  # Eq. 10: add alpha_tde * e (code: 2)
        self.balanced = Branch(cfg, width, num_classes, shift=None)
        self.attention = AdditiveAttention(cfg.feat_dim, cfg.attention_dropout) if cfg.attention else None
        self.attention_residual = cfg.attention_residual
        self.attention_in_training = cfg.attention_in_training

    def forward(self, inputs: Tensor) -> ComicOutput:
        """inputs: images [B, 3, H, W] (profile frozen: trunk features [B, width]) -> ComicOutput of [B, C] logits."""
        trunk = self.trunks(inputs)
        f_h, f_t = self.head.features(trunk["head"]), self.tail.features(trunk["tail"])
        f_b = self.balanced.features(trunk["balanced"])
        if self.attention is not None and (self.attention_in_training or not self.training):
            # Eq. 8 with detached keys: the head / tail models learn only from their own losses.
            keys = torch.stack([f_h, f_t], dim=1).detach()
            f_b = f_b + self.attention_residual * self.attention(f_b, keys)
        z_h, z_h_hat = self.head.logits(f_h)
        z_t, z_t_hat = self.tail.logits(f_t)
        z_b, _ = self.balanced.logits(f_b)
        return ComicOutput(z_b, z_h, z_t, z_h_hat, z_t_hat)

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """Adam groups per (model, module), named 'head/trunk' ... 'balanced/attention', with 'model', 'step_size'."""
        groups = []
        for name in self.MODELS:
            branch = getattr(self, name)
            groups += model_param_groups(name, self.trunks.trainable(name), branch.features, branch.classifier, optim)
        if self.attention is not None:
            groups.append(param_group("balanced", "attention", self.attention, optim))
        return groups
