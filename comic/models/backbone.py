"""Backbones and the feature extractor F every method's model is built from.

- trunks: torchvision ResNet-50 / ResNet-18 and a tiny CNN (CPU tests, embedded demo), classifier removed; ImageNet
  weights are torchvision's V1 files (the ones the released code loads with `pretrained=True`), fetched only here;
- F = trunk, then a trainable Linear(width -> feat_dim) and optional LogSoftmax, profile `released` (frozen trunk, as
  the released code) or `finetune` (everything trains);
- the optimizer groups of one model: '<model>/trunk' (when it trains), '<model>/feature', '<model>/classifier',
  each with its learning rate and StepLR step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from comic.config import ModelConfig, OptimConfig

log = logging.getLogger(__name__)

TINY_WIDTH = 64
# torchvision's ImageNet V1 weights, the ones the released code loads with `pretrained=True`.
IMAGENET_WEIGHTS = {
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
}
LR_KEYS = {"trunk": "lr_trunk", "feature": "lr_feature", "attention": "lr_attention", "classifier": "lr_classifier"}


class BackboneWeightsError(RuntimeError):
    """Backbone weights could not be fetched or loaded; the message says how to pass a local file."""


def _tiny_trunk() -> nn.Module:
    """Three stride-2 conv/BN/ReLU stages and global pooling: images [B, 3, H, W] -> [B, 64]."""
    layers: list[nn.Module] = []
    for c_in, c_out in ((3, 16), (16, 32), (32, TINY_WIDTH)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _imagenet_state(name: str) -> dict[str, Tensor]:
    if name not in IMAGENET_WEIGHTS:
        raise BackboneWeightsError(f"no ImageNet weights exist for backbone '{name}'; use model.weights=none")
    weights = IMAGENET_WEIGHTS[name]
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as err:  # URLError / HTTPError / socket errors are OSErrors
        file = weights.url.rsplit("/", 1)[-1]
        raise BackboneWeightsError(
            f"could not fetch the ImageNet weights of {name} from {weights.url} ({err}). On an offline machine, "
            f"download that file elsewhere and pass its path: model.weights=/path/to/{file} (a state dict), "
            f"or place it in {Path(torch.hub.get_dir()) / 'checkpoints'}") from err


def _file_state(path: str) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise BackboneWeightsError(f"model.weights={path!r} is neither 'none', 'imagenet' nor an existing file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"model.weights={path!r} holds a {type(state).__name__}, not a state dict")
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The trunk named by `cfg.backbone` (classifier removed) and its output width.

    `cfg.weights`: 'none' (random init), 'imagenet' (torchvision V1 weights, fetched only here; offline this raises
    BackboneWeightsError saying how to pass a file) or a path to a state dict (a `fc.*` classifier in it is ignored).
    The trunk maps images [B, 3, H, W] to [B, width].
    """
    if cfg.backbone == "tiny":
        trunk, width = _tiny_trunk(), TINY_WIDTH
    else:
        trunk = getattr(torchvision.models, cfg.backbone)(weights=None)
        width = trunk.fc.in_features
        trunk.fc = nn.Identity()
    if cfg.weights == "none":
        return trunk, width
    state = _imagenet_state(cfg.backbone) if cfg.weights == "imagenet" else _file_state(cfg.weights)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        trunk.load_state_dict(state)
    except RuntimeError as err:
        raise BackboneWeightsError(f"model.weights={cfg.weights!r} does not fit {cfg.backbone}: {err}") from err
    log.info("loaded %s weights for %s", cfg.weights, cfg.backbone)
    return trunk, width


class FeatureExtractor(nn.Module):
    """A model's feature extractor F: trunk, then a trainable Linear(width -> feat_dim) [+ LogSoftmax].

    Profile `released`: the trunk's parameters are frozen but its BatchNorm layers follow the module's train/eval
    mode as usual, so their running statistics still adapt to the training data (as in the released code).
    Profile `finetune`: the trunk trains too. images [B, 3, H, W] -> features [B, feat_dim].
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.trunk, width = build_backbone(cfg)
        self.fc = nn.Linear(width, cfg.feat_dim)
        self.log_softmax = cfg.log_softmax_feature
        if cfg.profile == "released":
            self.trunk.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        features = self.fc(self.trunk(images))
        return F.log_softmax(features, dim=1) if self.log_softmax else features


def param_group(model: str, module: str, part: nn.Module, optim: OptimConfig) -> dict | None:
    """One optimizer group; frozen parameters are left out (None when nothing in `part` trains)."""
    params = [p for p in part.parameters() if p.requires_grad]
    if not params:
        return None
    # Released code: balanced feature layer (and trunk) step 12, balanced attention / classifier 18, head and tail one
    # step each; with per_model_decay off (ablation DL) head and tail follow the balanced model's step for that module.
    balanced_step = optim.step_balanced_feature if module in ("trunk", "feature") else optim.step_balanced_other
    step = {"head": optim.step_head, "tail": optim.step_tail}.get(model, balanced_step)
    return {"params": params, "lr": getattr(optim, LR_KEYS[module]), "weight_decay": optim.weight_decay,
            "name": f"{model}/{module}", "model": model, "module": module,
            "step_size": step if optim.per_model_decay else balanced_step}


def extractor_param_groups(model: str, features: FeatureExtractor, classifier: nn.Module,
                           optim: OptimConfig) -> list[dict]:
    """Groups '<model>/trunk' (when it trains), '<model>/feature' and '<model>/classifier'."""
    parts = {"trunk": features.trunk, "feature": features.fc, "classifier": classifier}
    return [g for module, part in parts.items() if (g := param_group(model, module, part, optim)) is not None]


