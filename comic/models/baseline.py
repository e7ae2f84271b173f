"""The baselines' network: the same trunk (and profile) and feature layer as one COMIC model, then a linear layer."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from comic.config import ModelConfig, OptimConfig
from comic.models.backbone import FeatureLayer, Trunks, model_param_groups


class BaselineOutput(NamedTuple):
    logits: Tensor  # [B, C]


class BaselineNet(nn.Module):
    """Trunk, feature layer and a linear classifier: inputs (images, or cached trunk features) -> logits [B, C]."""

    def __init__(self, cfg: ModelConfig, num_classes: int, width: int | None = None) -> None:
        super().__init__()
        self.trunks = Trunks(cfg, ("baseline",), width)
        self.features = FeatureLayer(cfg, self.trunks.width)
        self.classifier = nn.Linear(cfg.feat_dim, num_classes)

    def embed(self, inputs: Tensor) -> Tensor:
        """inputs: images [B, 3, H, W] or trunk features [B, width] -> features [B, feat_dim]."""
        return self.features(self.trunks(inputs)["baseline"])

    def forward(self, inputs: Tensor) -> BaselineOutput:
        """inputs: images [B, 3, H, W] or trunk features [B, width] -> BaselineOutput(logits [B, C])."""
        return BaselineOutput(self.classifier(self.embed(inputs)))

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """Groups 'baseline/trunk' (finetune only), 'baseline/feature', 'baseline/classifier'; balanced-model steps."""
        return model_param_groups("baseline", self.trunks.trainable("baseline"), self.features, self.classifier, optim)
