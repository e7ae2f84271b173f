"""COMIC's three-branch network and the plain baseline network.

Implements the model side of the paper (reference: `comic-method.md` §2-§4):
- backbones: torchvision ResNet-50 / ResNet-18 trunks and a tiny CNN (CPU tests, embedded demo), followed by the
  trainable feature layer F (2048 -> feat_dim, optional LogSoftmax, profile `released` / `finetune`, §2);
- Eq. 7: the moving vector e, read as TDE's running sum of batch-mean features (the paper says "gradient"; the
  released code and TDE use features, and only e's direction is ever used);
- Eq. 8: additive attention of the balanced features over the (detached) head / tail features;
- Eq. 9: the normalized multi-group classifier z = (rho / N_g) sum_k w_k f_k / ((||w_k|| + eta) ||f_k||);
- Eq. 10: head / tail logits with e's projection removed / added (coefficients 1 and alpha_tde, released code).

No method reads a tensor value on the host, so `forward` can be compiled or captured in a CUDA graph.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from comic.config import ModelConfig, OptimConfig

log = logging.getLogger(__name__)

TINY_WIDTH = 64
# torchvision's ImageNet V1 weights, the ones the released code loads with `pretrained=True` (§2).
IMAGENET_WEIGHTS = {
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
}
LR_KEYS = {"trunk": "lr_trunk", "feature": "lr_feature", "attention": "lr_attention", "classifier": "lr_classifier"}


class BackboneWeightsError(RuntimeError):
    """Backbone weights could not be fetched or loaded; the message says how to pass a local file."""


class ComicOutput(NamedTuple):
    """All outputs are [B, C] logits. `logits` = z_b is the prediction; the rest are Eq. 9-10's head/tail logits."""

    logits: Tensor
    z_h: Tensor
    z_t: Tensor
    z_h_hat: Tensor
    z_t_hat: Tensor


class BaselineOutput(NamedTuple):
    logits: Tensor  # [B, C]


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
    """A model's feature extractor F (§2): trunk, then a trainable Linear(width -> feat_dim) [+ LogSoftmax].

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


class MovingVector(nn.Module):
    """Eq. 7: e <- mu * e + mean_batch(f), once per training forward (TDE's feature form), frozen in eval.

    `e` is a buffer, so it is saved with the model's state dict and moves with it between devices.
    """

    def __init__(self, dim: int, mu: float) -> None:
        super().__init__()
        self.mu = mu
        self.register_buffer("e", torch.zeros(dim))

    def forward(self, features: Tensor) -> Tensor:
        """features: [B, d] -> e: [d] (updated first in training, as the released code does before the logits)."""
        if self.training:
            self.e.mul_(self.mu).add_(features.detach().float().mean(0))
        return self.e


class NormalizedClassifier(nn.Module):
    """Eq. 9 (and Eq. 10 when e is given): TDE's causal-norm classifier with N_g groups, no bias.

    z_c = (rho / N_g) sum_k w~_ck . f^_k with f^_k = f_k / ||f_k||, w~_ck = w_ck / (||w_ck|| + eta).
    z^_c = (rho / N_g) sum_k w~_ck . (f^_k + shift * cos(f_k, e_k) e^_k): shift = -1 gives the head logits
    (e's projection removed), shift = +alpha_tde the tail logits.
    """

    def __init__(self, feat_dim: int, num_classes: int, rho: float, eta: float, groups: int) -> None:
        super().__init__()
        if feat_dim % groups:
            raise ValueError(f"model.feat_dim={feat_dim} must be divisible by model.groups={groups}")
        self.rho, self.eta, self.groups = rho, eta, groups
        bound = 1 / math.sqrt(feat_dim)
        self.weight = nn.Parameter(torch.empty(num_classes, feat_dim).uniform_(-bound, bound))

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.groups, -1))

    def forward(self, features: Tensor, e: Tensor | None = None, shift: float = 0.0) -> tuple[Tensor, Tensor]:
        """features: [B, d]; e: [d] or None -> (z, z_hat), both [B, C] (z_hat = z without e)."""
        f_hat = F.normalize(self._split(features), dim=-1)  # [B, G, d/G]
        w = self._split(self.weight)  # [C, G, d/G]
        w_tilde = w / (w.norm(dim=-1, keepdim=True) + self.eta)
        scale = self.rho / self.groups
        z = scale * torch.einsum("bgk,cgk->bc", f_hat, w_tilde)
        if e is None:
            return z, z
        e_hat = F.normalize(self._split(e.to(f_hat.dtype)), dim=-1)  # [G, d/G]; e = 0 gives e_hat = 0, z_hat = z
        cos = torch.einsum("bgk,gk->bg", f_hat, e_hat)
        w_on_e = torch.einsum("cgk,gk->cg", w_tilde, e_hat)
        return z, z + (shift * scale) * cos @ w_on_e.T


class LinearClassifier(nn.Module):
    """NC off: a plain linear classifier; Eq. 10 then shifts the raw feature, z^ = W (f + shift (f . e^) e^) + b."""

    def __init__(self, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(feat_dim, num_classes)

    def forward(self, features: Tensor, e: Tensor | None = None, shift: float = 0.0) -> tuple[Tensor, Tensor]:
        """features: [B, d]; e: [d] or None -> (z, z_hat), both [B, C]."""
        z = self.fc(features)
        if e is None:
            return z, z
        e_hat = F.normalize(e.to(features.dtype), dim=0)
        return z, z + shift * (features @ e_hat)[:, None] * (self.fc.weight @ e_hat)[None, :]


class AdditiveAttention(nn.Module):
    """Eq. 8's Attn (Bahdanau): s_j = w_v^T tanh(W_q q + W_k k_j); a = dropout(softmax_j s); out = sum_j a_j k_j.

    Bias-free projections and no value projection, as in the released code.
    """

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.w_v = nn.Linear(dim, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """query: [B, d]; keys (= values): [B, J, d] -> [B, d]."""
        scores = self.w_v(torch.tanh(self.w_q(query)[:, None] + self.w_k(keys))).squeeze(-1)  # [B, J]
        weights = self.dropout(scores.softmax(dim=-1))
        return torch.einsum("bj,bjd->bd", weights, keys)


def build_classifier(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.normalized_classifier:
        return NormalizedClassifier(cfg.feat_dim, num_classes, cfg.rho, cfg.eta, cfg.groups)
    return LinearClassifier(cfg.feat_dim, num_classes)


def _param_group(model: str, module: str, part: nn.Module, optim: OptimConfig) -> dict | None:
    """One optimizer group; frozen parameters are left out (None when nothing in `part` trains)."""
    params = [p for p in part.parameters() if p.requires_grad]
    if not params:
        return None
    # §10: balanced feature layer (and trunk) 12, balanced attention / classifier 18, head and tail one step each;
    # with per_model_decay off (ablation DL) head and tail modules follow the balanced model's step for that module.
    balanced_step = optim.step_balanced_feature if module in ("trunk", "feature") else optim.step_balanced_other
    step = {"head": optim.step_head, "tail": optim.step_tail}.get(model, balanced_step)
    return {"params": params, "lr": getattr(optim, LR_KEYS[module]), "weight_decay": optim.weight_decay,
            "name": f"{model}/{module}", "model": model, "module": module,
            "step_size": step if optim.per_model_decay else balanced_step}


def extractor_param_groups(model: str, features: FeatureExtractor, classifier: nn.Module,
                           optim: OptimConfig) -> list[dict]:
    """Groups '<model>/trunk' (when it trains), '<model>/feature' and '<model>/classifier'."""
    parts = {"trunk": features.trunk, "feature": features.fc, "classifier": classifier}
    return [g for module, part in parts.items() if (g := _param_group(model, module, part, optim)) is not None]


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
    """Head, tail and balanced models run side by side on the same images (§1); z_b = `logits` is the prediction.

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
            # Eq. 8 with detached keys: the head / tail backbones learn only from their own losses (§3, §8).
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
            groups.append(_param_group("balanced", "attention", self.attention, optim))
        return groups


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
