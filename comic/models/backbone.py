"""Trunks and the feature layer every method's model is built from.

- `build_trunk`: any torchvision classification model (`torchvision.models.list_models`), any timm model
  (`timm/<name>`, e.g. `timm/tf_efficientnet_lite2`) or the tiny CNN of the embedded demo, without its classifier:
  its penultimate (pooled) features. torchvision: the last Linear, and the Dropout beside it, become Identity; timm:
  `reset_classifier(0)`. Weights: 'none', 'imagenet' (torchvision's ImageNet file, read from the hub cache when it is
  there; timm's default pretrained weights from the Hugging Face hub) or a state-dict file (timm's key names for a
  timm trunk; loaded strictly).
- `timm_data_config`: a timm trunk's pretrained data config (size, crop, interpolation, normalisation), which
  `comic.data.images.trunk_preprocess` turns into the pixels the image path, the feature cache and served models
  give it.
- `Trunks`: the trunk(s) under a method's models, by `model.profile`:
    released  one frozen trunk shared by all the method's models: one forward feeds every feature layer (the models'
              trunks would be identical: same weights, frozen, the same batch through train-mode BatchNorm);
    finetune  one trainable trunk per model;
    frozen    none: the inputs are cached trunk features (`comic.data.features`; eval-mode BatchNorm).
- `FeatureLayer`: the trainable Linear(width -> feat_dim) [+ LogSoftmax] of the released code on top of the trunk.
- the optimizer groups of one model: '<model>/trunk' (when it trains), '<model>/feature', '<model>/classifier'.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from comic._io import UserError, file_digest
from comic.config import ModelConfig, OptimConfig

log = logging.getLogger(__name__)

TINY_WIDTH = 64
TIMM_PREFIX = "timm/"
LR_KEYS = {"trunk": "lr_trunk", "feature": "lr_feature", "attention": "lr_attention", "classifier": "lr_classifier"}


class BackboneWeightsError(UserError, RuntimeError):
    """A backbone is unknown, or its weights could not be fetched or loaded; the message says what to do."""


def _tiny_trunk() -> nn.Module:
    """Three stride-2 conv/BN/ReLU stages and global pooling: images [B, 3, H, W] -> [B, 64]."""
    layers: list[nn.Module] = []
    for c_in, c_out in ((3, 16), (16, 32), (32, TINY_WIDTH)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def classification_models() -> list[str]:
    """The torchvision classification models `model.backbone` may name (besides 'tiny')."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _model(name: str) -> nn.Module:
    if name == "tiny":
        return _tiny_trunk()
    names = classification_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BackboneWeightsError(f"model.backbone={name!r} is not a torchvision classification model{hint} "
                                   f"(or '{TIMM_PREFIX}<any timm model>', or 'tiny')")
    return torchvision.models.get_model(name, weights=None)


def is_timm(backbone: str) -> bool:
    return backbone.startswith(TIMM_PREFIX)


def _timm():
    try:
        import timm
    except ImportError as err:
        raise BackboneWeightsError("a timm/<name> backbone needs the timm package: pip install timm") from err
    return timm


def _timm_arch(backbone: str) -> str:
    """`timm/<name>[.<tag>]` -> `<name>[.<tag>]`, checked against timm's model list."""
    timm = _timm()
    arch = backbone.removeprefix(TIMM_PREFIX)
    if not timm.is_model(timm.models.split_model_name_tag(arch)[0]):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise BackboneWeightsError(f"model.backbone={backbone!r}: timm has no model {arch!r}{hint}")
    return arch


def _timm_trunk(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """A timm model without its classifier (pooled features [B, num_features]), weights loaded strictly."""
    timm, arch = _timm(), _timm_arch(cfg.backbone)
    if cfg.weights == "imagenet":
        try:
            model = timm.create_model(arch, pretrained=True)
        except (OSError, RuntimeError, ValueError) as err:  # hub download errors are OSErrors (HTTP, offline)
            raise BackboneWeightsError(
                f"could not fetch timm's pretrained weights of {arch} ({err}). On an offline machine pass a "
                "state-dict file in timm's key names: model.weights=/path/to/file.pth") from err
    else:
        model = timm.create_model(arch, pretrained=False)
        if cfg.weights != "none":
            _load(model, _file_state(cfg.weights), cfg, classifier=None)
    model.reset_classifier(0)
    return model, int(model.num_features)


def timm_data_config(backbone: str) -> Any | None:
    """timm's pretrained config of a `timm/<name>` trunk (input_size, crop_pct, interpolation, mean, std), or None
    for a torchvision trunk or a timm model without one."""
    if not is_timm(backbone):
        return None
    return _timm().models.get_pretrained_cfg(_timm_arch(backbone))


def imagenet_weights(name: str) -> torchvision.models.WeightsEnum:
    """torchvision's ImageNet weights of `name`: IMAGENET1K_V1 where it exists (what the released code loads for
    ResNet-50 with `pretrained=True`), else the model's default."""
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as err:
        raise BackboneWeightsError(f"no ImageNet weights exist for backbone {name!r}; use model.weights=none or a "
                                   "file") from err
    return getattr(enum, "IMAGENET1K_V1", None) or enum.DEFAULT


def _weights_file(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneWeightsError(f"model.weights={weights!r} is neither 'none', 'imagenet' nor an existing file")
    return path


def weights_id(cfg: ModelConfig) -> str:
    """What identifies the trunk's weights (a feature cache's key): 'none', torchvision's file name for 'imagenet'
    (it carries the file's hash), timm's hub id of its pretrained weights, or the sha256 of a weights file."""
    if cfg.weights == "none":
        return "none"
    if cfg.weights == "imagenet" and is_timm(cfg.backbone):
        data = _timm().models.get_pretrained_cfg(_timm_arch(cfg.backbone))
        return f"timm:{data.hf_hub_id or data.url}" if data is not None else f"timm:{cfg.backbone}"
    if cfg.weights == "imagenet":
        return f"imagenet:{imagenet_weights(cfg.backbone).url.rsplit('/', 1)[-1]}"
    return f"file:{file_digest(_weights_file(cfg.weights))[:16]}"


def _imagenet_state(name: str) -> dict[str, Tensor]:
    weights = imagenet_weights(name)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as err:  # URLError / HTTPError / socket errors are OSErrors
        file = weights.url.rsplit("/", 1)[-1]
        raise BackboneWeightsError(
            f"could not fetch the ImageNet weights of {name} from {weights.url} ({err}). On an offline machine, "
            f"download that file elsewhere and place it in {Path(torch.hub.get_dir()) / 'checkpoints'} (then "
            f"model.weights=imagenet finds it), or pass its path: model.weights=/path/to/{file}") from err


def _file_state(path: str) -> dict[str, Tensor]:
    state = torch.load(_weights_file(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"model.weights={path!r} holds a {type(state).__name__}, not a state dict")
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _classifier(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last Linear layer of a model (its classifier), by module order; None for the tiny trunk."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _strip_classifier(model: nn.Module, name: str) -> None:
    """Replace the classifier `name` (and a Dropout in the same Sequential) by Identity, in place."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential):
        for key, module in parent.named_children():
            if key == child or isinstance(module, nn.Dropout):
                setattr(parent, key, nn.Identity())
    else:
        setattr(parent, child, nn.Identity())


def _load(model: nn.Module, state: dict[str, Tensor], cfg: ModelConfig, classifier: str | None) -> None:
    """Load `state` into the whole model; a file may leave out the classifier (it is removed anyway)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise BackboneWeightsError(f"model.weights={cfg.weights!r} does not fit {cfg.backbone}: {err}") from err
    missing = [k for k in missing if classifier is None or not k.startswith(classifier + ".")]
    if missing or unexpected:
        raise BackboneWeightsError(f"model.weights={cfg.weights!r} does not fit {cfg.backbone}: missing keys "
                                   f"{missing[:5]}, unexpected keys {unexpected[:5]}")


def build_trunk(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The trunk named by `cfg.backbone` with `cfg.weights`, classifier removed, and its output width.

    The trunk maps images [B, 3, H, W] to [B, width]. Offline, 'imagenet' raises BackboneWeightsError saying where
    to put the file.
    """
    if is_timm(cfg.backbone):
        return _timm_trunk(cfg)
    model = _model(cfg.backbone)
    found = _classifier(model)
    classifier = found[0] if found else None
    if cfg.weights != "none":
        state = _imagenet_state(cfg.backbone) if cfg.weights == "imagenet" else _file_state(cfg.weights)
        _load(model, state, cfg, classifier)
        log.info("loaded %s weights for %s", cfg.weights, cfg.backbone)
    if found is None:
        return model, TINY_WIDTH
    _strip_classifier(model, found[0])
    return model, found[1].in_features


class Trunks(nn.Module):
    """The trunk(s) under the models `names` (see the module docstring for the profiles).

    inputs: images [B, 3, H, W] (or, profile frozen, trunk features [B, width]) -> {name: [B, width]}.
    """

    def __init__(self, cfg: ModelConfig, names: Sequence[str], width: int | None = None) -> None:
        super().__init__()
        self.names = tuple(names)
        self.shared: nn.Module | None = None
        self.own = nn.ModuleDict()
        if cfg.profile == "frozen":
            if width is None:
                raise ValueError("model.profile=frozen: the models need the width of the cached trunk features")
            self.shared, self.width = nn.Identity(), width
        elif cfg.profile == "released":
            self.shared, self.width = build_trunk(cfg)
            self.shared.requires_grad_(False)
        else:
            for name in self.names:
                self.own[name], self.width = build_trunk(cfg)

    def forward(self, inputs: Tensor) -> dict[str, Tensor]:
        if self.shared is not None:
            shared = self.shared(inputs)  # one forward for every model
            return dict.fromkeys(self.names, shared)
        return {name: trunk(inputs) for name, trunk in self.own.items()}

    def trainable(self, name: str) -> nn.Module | None:
        """Model `name`'s own trunk when it trains (profile finetune), else None."""
        return self.own[name] if name in self.own else None


class FeatureLayer(nn.Module):
    """F on top of a trunk: a trainable Linear(width -> feat_dim), then LogSoftmax when `log_softmax_feature` (the
    released code). trunk features [B, width] -> features [B, feat_dim]."""

    def __init__(self, cfg: ModelConfig, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, cfg.feat_dim)
        self.log_softmax = cfg.log_softmax_feature

    def forward(self, trunk_features: Tensor) -> Tensor:
        features = self.fc(trunk_features)
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


def model_param_groups(model: str, trunk: nn.Module | None, features: FeatureLayer, classifier: nn.Module,
                       optim: OptimConfig) -> list[dict]:
    """Groups '<model>/trunk' (when it trains), '<model>/feature' and '<model>/classifier'."""
    parts = {"trunk": trunk, "feature": features, "classifier": classifier}
    return [g for module, part in parts.items() if part is not None
            and (g := param_group(model, module, part, optim)) is not None]
