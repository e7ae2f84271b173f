"""THE method registry: name -> builder(cfg, stats) -> Method(model, criterion, hooks).

Baselines are entries. COMIC ablations are not: they are overrides of `comic` (`rlc.enabled=false`), so the full and
the ablated method share one code path. Unknown or duplicate names raise and list the valid names.
A baseline's loss hyperparameters come from `loss.baseline` (e.g. `loss.baseline.gamma_neg=2` for `asl`); the loss
class's keyword arguments are the schema, so a misspelt key raises naming the valid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from comic import losses
from comic.config import Config, ConfigError, OptimConfig
from comic.models import BaselineNet, ComicNet, GCNNet, LWSNet
from comic.models.gcn import correlation_matrix, load_label_embeddings


@dataclass(frozen=True)
class DataStats:
    """What a builder may know about the training data (observed labels only; never the full labels)."""

    class_names: list[str]
    train_counts: np.ndarray  # [C] observed positive images per class
    train_observed: np.ndarray  # [N, C] uint8 observed training labels
    input_width: int | None = None  # profile frozen: width D of the cached trunk features the models take

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_images(self) -> int:
        return int(self.train_observed.shape[0])

    def counts_tensor(self) -> torch.Tensor:
        return torch.as_tensor(self.train_counts, dtype=torch.float32)


class Model(Protocol):
    """What the trainer asks of a method's network."""

    def __call__(self, images: Tensor) -> NamedTuple:
        """images: [B, 3, H, W] -> a NamedTuple whose first field `logits` [B, C] is the prediction."""

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """Adam parameter groups, each with 'name', 'model', 'lr', 'weight_decay' and 'step_size' (epochs)."""


class Criterion(Protocol):
    """What the trainer asks of a method's loss."""

    corrects_labels: bool  # whether parts['corrected'] can differ from the observed labels (then rlc/* is logged)

    def __call__(self, out: NamedTuple, observed: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """out: the model's output; observed: [B, C] 0/1 -> (total loss [], parts: name -> detached tensor)."""

    def start_epoch(self, epoch: int) -> None:
        """Before each 1-based epoch (epoch-dependent state such as RLC's D_t is reset here)."""


def _always_random(epoch: int) -> str:
    return "random"


def _nothing(epoch: int) -> None:
    return None


@dataclass
class MethodHooks:
    """What a method asks of the trainer beyond `model` and `criterion`, before each 1-based epoch.

    sampler(epoch) -> 'random' | 'class-aware': that epoch's training sampler; start_epoch(epoch): a method's own
    switch (LWS starts its second stage there).
    """

    sampler: Callable[[int], str] = _always_random
    start_epoch: Callable[[int], None] = _nothing


@dataclass
class Method:
    model: Model
    criterion: Criterion
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


def loss_kwargs(cfg: Config, loss_cls: type, reserved: tuple[str, ...] = ()) -> dict[str, Any]:
    """`loss.baseline` minus the method-level keys in `reserved`, checked against `loss_cls`'s keyword arguments."""
    accepted = [p for p in inspect.signature(loss_cls.__init__).parameters if p != "self"]
    kwargs = {k: v for k, v in cfg.loss.baseline.items() if k not in reserved}
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"loss.baseline.{unknown[0]}: not a parameter of method '{cfg.method}' "
                          f"({loss_cls.__name__} accepts: {', '.join(accepted + list(reserved))})")
    return kwargs


def _plain(loss_cls: type, sampler: Callable[[int], str] = _always_random, **fixed: Any) -> Builder:
    """A baseline = BaselineNet + one plain loss; `fixed` are data-derived constructor arguments."""

    def build(cfg: Config, stats: DataStats) -> Method:
        extra = {k: v(stats) if callable(v) else v for k, v in fixed.items()}
        loss = loss_cls(**(extra | loss_kwargs(cfg, loss_cls)))
        criterion = losses.LossCriterion(loss, cfg.method.replace("-", "_"))
        return Method(BaselineNet(cfg.model, stats.num_classes, stats.input_width), criterion,
                      MethodHooks(sampler=sampler))

    return build


def _class_aware(epoch: int) -> str:
    return "class-aware"


@register("comic")
def _comic(cfg: Config, stats: DataStats) -> Method:
    model = ComicNet(cfg.model, stats.num_classes, stats.input_width)
    return Method(model, losses.ComicCriterion.from_config(cfg, stats.counts_tensor()))


def _register_plain_baselines() -> None:
    """BCE / Focal / ASL / Hill / SPLC / Pseudo-Label: BaselineNet + the loss. DB and DB-Focal also get the observed
    counts and class-aware sampling (their re-balanced weights are designed for class-aware re-sampled batches, as in
    the DB reference); P-ASL gets the observed class frequencies as its prior (the ignore-mode prior of the reference
    is degenerate without annotated negatives)."""
    counts = {"class_counts": lambda s: s.counts_tensor(), "num_images": lambda s: s.num_images}
    register("bce")(_plain(losses.BCE))
    register("focal")(_plain(losses.Focal))
    register("asl")(_plain(losses.ASL))
    register("hill")(_plain(losses.Hill))
    register("splc")(_plain(losses.SPLC))
    register("pseudo-label")(_plain(losses.PseudoLabel))
    # Summed like every other loss here: with Adam and coupled L2, DB's reference mean (the sum / B*C) would make
    # weight decay B*C times stronger relative to its gradient than for the others (loss.baseline.reduction=mean
    # restores the reference).
    register("db")(_plain(losses.DB, sampler=_class_aware, reduction="sum", **counts))
    register("db-focal")(_plain(losses.DBFocal, sampler=_class_aware, reduction="sum", **counts))
    prior = {"class_prior": lambda s: losses.PartialASL.prior_from_counts(s.counts_tensor(), s.num_images)}
    register("p-asl")(_plain(losses.PartialASL, **prior))


_register_plain_baselines()


@register("ml-gcn")
def _ml_gcn(cfg: Config, stats: DataStats) -> Method:
    """ML-GCN: the classifier comes from a GCN over label embeddings (`model.label_embeddings`) and the correlation
    matrix of the observed training labels (threshold 0.4, p = 0.25); loss BCE."""
    embeddings = load_label_embeddings(cfg.model.label_embeddings, stats.num_classes, seed=cfg.seed)
    model = GCNNet(cfg.model, embeddings, correlation_matrix(stats.train_observed), stats.input_width)
    return Method(model, losses.LossCriterion(losses.BCE(**loss_kwargs(cfg, losses.BCE)), "bce"))


@register("lws")
def _lws(cfg: Config, stats: DataStats) -> Method:
    """LWS (Kang et al. 2020): BCE training of BaselineNet, then for the last `loss.baseline.stage2_epochs` epochs
    (default a fifth, at least 1) a per-class logit scale learned on the frozen network with class-aware sampling."""
    reserved = ("stage2_epochs", "scale_lr")
    stage2 = int(cfg.loss.baseline.get("stage2_epochs", max(1, cfg.train.epochs // 5)))
    if not 1 <= stage2 < cfg.train.epochs:
        raise ConfigError(f"loss.baseline.stage2_epochs={stage2}: must be in [1, train.epochs - 1] "
                          f"(train.epochs={cfg.train.epochs})")
    first = cfg.train.epochs - stage2 + 1
    model = LWSNet(cfg.model, stats.num_classes, first, float(cfg.loss.baseline.get("scale_lr", 1e-2)),
                   stats.input_width)
    criterion = losses.LossCriterion(losses.BCE(**loss_kwargs(cfg, losses.BCE, reserved)), "bce")
    sampler = _StageSampler(first)
    return Method(model, criterion, MethodHooks(sampler=sampler, start_epoch=model.start_epoch))


@dataclass(frozen=True)
class _StageSampler:
    """LWS: random sampling before its second stage, class-aware from epoch `first` on."""

    first: int

    def __call__(self, epoch: int) -> str:
        return "class-aware" if epoch >= self.first else "random"
