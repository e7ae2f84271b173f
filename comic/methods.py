"""THE method registry: name -> builder(cfg, stats) -> Method(model, criterion, hooks).

Baselines are entries. COMIC ablations are not: they are overrides of `comic` (`rlc.enabled=false`), so the full and
the ablated method share one code path. Unknown or duplicate names raise and list the valid names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from comic.config import Config


@dataclass(frozen=True)
class DataStats:
    """What a builder may know about the training data (observed labels only; never the full labels)."""

    class_names: list[str]
    train_counts: np.ndarray  # [C] observed positive images per class
    train_observed: np.ndarray  # [N, C] uint8 observed training labels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def counts_tensor(self) -> torch.Tensor:
        return torch.as_tensor(self.train_counts, dtype=torch.float32)


@dataclass
class MethodHooks:
    """What a method asks of the trainer beyond `model` and `criterion`."""

    sampler: str = "random"  # 'random' or 'class-aware' (multi-label class-aware sampling)
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class Method:
    model: nn.Module
    criterion: nn.Module
    hooks: MethodHooks = field(default_factory=MethodHooks)


Builder = Callable[[Config, DataStats], Method]
METHODS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder under `name`; a duplicate name raises."""

    def add(builder: Builder) -> Builder:
        if name in METHODS:
            raise KeyError(f"method '{name}' is already registered")
        METHODS[name] = builder
        return builder

    return add


def list_methods() -> list[str]:
    return sorted(METHODS)


def build_method(cfg: Config, stats: DataStats) -> Method:
    """Build `cfg.method`; an unknown name raises listing the valid ones."""
    if cfg.method not in METHODS:
        raise KeyError(f"unknown method '{cfg.method}'; valid methods: {', '.join(list_methods())}")
    return METHODS[cfg.method](cfg, stats)


@register("comic")
def _comic(cfg: Config, stats: DataStats) -> Method:
    from comic.losses import ComicCriterion
    from comic.models import ComicNet

    model = ComicNet(cfg.model, stats.num_classes)
    return Method(model, ComicCriterion.from_config(cfg, stats.counts_tensor()))


@register("bce")
def _bce(cfg: Config, stats: DataStats) -> Method:
    from comic.losses import BCECriterion
    from comic.models import BaselineNet

    return Method(BaselineNet(cfg.model, stats.num_classes), BCECriterion.from_config(cfg))
