"""The baselines' network: the same feature extractor (and profile) as one COMIC model, then a linear layer."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from comic.config import ModelConfig, OptimConfig
from comic.models.backbone import FeatureExtractor, extractor_param_groups


class BaselineOutput(NamedTuple):
    logits: Tensor  # [B, C]


class BaselineNet(nn.Module):
    """The baselines' network: the same feature extractor (and profile) as one COMIC model, then a linear layer."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.features = FeatureExtractor(cfg)
        self.classifier = nn.Linear(cfg.feat_dim, num_classes)

    def forward(self, images: Tensor) -> BaselineOutput:
        """images: [B, 3, H, W] -> BaselineOutput(logits [B, C])."""
        return BaselineOutput(self.classifier(self.features(images)))

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """Groups 'baseline/trunk' (finetune only), 'baseline/feature', 'baseline/classifier'; balanced-model steps."""
        return extractor_param_groups("baseline", self.features, self.classifier, optim)
