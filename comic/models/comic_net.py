"""COMIC's three-model network: head, tail and balanced models side by side on the same images."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from comic.config import ModelConfig, OptimConfig
from comic.models.backbone import FeatureExtractor, extractor_param_groups, param_group
from comic.models.layers import AdditiveAttention, MovingVector, build_classifier


class ComicOutput(NamedTuple):
    """All outputs are [B, C] logits. `logits` = z_b is the prediction; the rest are Eq. 9-10's head/tail logits."""

    logits: Tensor
    z_h: Tensor
    z_t: Tensor
    z_h_hat: Tensor
    z_t_hat: Tensor


class Branch(nn.Module):
    """One of COMIC's three models: feature extractor, classifier and (head / tail) the moving vector e."""

    def __init__(self, cfg: ModelConfig, num_classes: int, shift: float | None) -> None:
        super().__init__()
        self.features = FeatureExtractor(cfg)
        self.classifier = build_classifier(cfg, num_classes)
        self.shift = shift or 0.0
        # AMV off (or the balanced model, whose e the released code never uses): z_hat = z.
        self.moving = MovingVector(cfg.feat_dim, cfg.mu) if shift is not None and cfg.moving_vector else None

    def logits(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features: [B, d] -> (z, z_hat): [B, C] each (Eq. 9, Eq. 10)."""
        e = self.moving(features) if self.moving is not None else None
        return self.classifier(features, e, self.shift)


class ComicNet(nn.Module):
    """Head, tail and balanced models run side by side on the same images; z_b = `logits` is the prediction.

    Evaluation also runs all three backbones because the balanced features attend over the head / tail features.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.head = Branch(cfg, num_classes, shift=-1.0)  # Eq. 10: subtract e (coefficient 1)
        self.tail = Branch(cfg, num_classes, shift=cfg.alpha_tde)  # Eq. 10: add alpha_tde * e (released code: 2)
        self.balanced = Branch(cfg, num_classes, shift=None)
        self.attention = AdditiveAttention(cfg.feat_dim, cfg.attention_dropout) if cfg.attention else None
        self.attention_residual = cfg.attention_residual
        self.attention_in_training = cfg.attention_in_training

    def forward(self, images: Tensor) -> ComicOutput:
        """images: [B, 3, H, W] -> ComicOutput of [B, C] logits."""
        f_h, f_t = self.head.features(images), self.tail.features(images)
        f_b = self.balanced.features(images)
        if self.attention is not None and (self.attention_in_training or not self.training):
            # Eq. 8 with detached keys: the head / tail backbones learn only from their own losses.
            keys = torch.stack([f_h, f_t], dim=1).detach()
            f_b = f_b + self.attention_residual * self.attention(f_b, keys)
        z_h, z_h_hat = self.head.logits(f_h)
        z_t, z_t_hat = self.tail.logits(f_t)
        z_b, _ = self.balanced.logits(f_b)
        return ComicOutput(z_b, z_h, z_t, z_h_hat, z_t_hat)

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """Adam groups per (model, module), named 'head/trunk' ... 'balanced/attention', with 'model', 'step_size'."""
        groups = []
        for name in ("head", "tail", "balanced"):
            branch = getattr(self, name)
            groups += extractor_param_groups(name, branch.features, branch.classifier, optim)
        if self.attention is not None:
            groups.append(param_group("balanced", "attention", self.attention, optim))
        return groups


