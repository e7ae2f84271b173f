"""THE method registry: name -> builder(cfg, stats) -> Method(model, criterion, hooks), and each entry's search space.

Baselines are entries. COMIC ablations are not: they are overrides of `comic` (`rlc.enabled=false`), so the full and
the ablated method share one code path. Unknown or duplicate names raise and list the valid names.
A baseline's loss hyperparameters come from `loss.baseline` (e.g. `loss.baseline.gamma_neg=2` for `asl`); the loss
class's keyword arguments are the schema, so a misspelt key raises naming the valid ones.

Every entry declares its hyperparameters and their ranges once (`search_space`, in `comic.tuning.space`'s format:
`{key: {uniform|loguniform|int: [low, high]}}`): the optimizer's learning rates and decay, and the loss's own
parameters; sweeps and the equal-budget tuning study read them from here.
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
SPACES: dict[str, dict[str, Any]] = {}  # name -> dotted config key -> range
LOSSES: dict[str, type] = {}  # name -> the loss class whose keyword arguments `loss.baseline.*` set

# Every method's optimizer (frozen trunk: the heads): around a decade each side of the defaults (1e-3, 1e-4, 1e-4).
OPTIM_SPACE: dict[str, Any] = {"optim.lr_feature": {"loguniform": [1e-4, 1e-2]},
                               "optim.lr_classifier": {"loguniform": [1e-5, 1e-2]},
                               "optim.weight_decay": {"loguniform": [1e-6, 1e-3]}}


def register(name: str, space: dict[str, Any] | None = None,
             loss: type | None = None) -> Callable[[Builder], Builder]:
    """Decorator adding a builder under `name` with its search space (OPTIM_SPACE plus `space`); `loss`: the loss
    class `loss.baseline.*` configures (its keyword defaults are the space's default point). A duplicate raises."""

    def add(builder: Builder) -> Builder:
        if name in METHODS:
            raise KeyError(f"method '{name}' is already registered")
        METHODS[name], SPACES[name] = builder, OPTIM_SPACE | (space or {})
        if loss is not None:
            LOSSES[name] = loss
        return builder

    return add


def list_methods() -> list[str]:
    return sorted(METHODS)


def search_space(method: str) -> dict[str, Any]:
    """The hyperparameters `method` is tuned over and their ranges; an unknown name raises listing the valid ones."""
    if method not in SPACES:
        raise KeyError(f"unknown method '{method}'; valid methods: {', '.join(list_methods())}")
    return dict(SPACES[method])


def loss_defaults(cfg: Config) -> dict[str, Any]:
    """`loss.baseline.<name>` -> the value `cfg.method`'s loss uses: set in `cfg.loss.baseline`, else the loss class's
    keyword default (what a search space's default point needs for keys the config leaves unset)."""
    loss = LOSSES.get(cfg.method)
    params = inspect.signature(loss.__init__).parameters.values() if loss else ()
    defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}
    return {f"loss.baseline.{k}": v for k, v in (defaults | cfg.loss.baseline).items()}


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


@register("comic", space={
    "htb.alpha": {"uniform": [0.5, 4.0]}, "rlc.tau": {"uniform": [0.5, 0.95]},
    "mfm.gamma_neg": {"uniform": [1.0, 5.0]}, "mfm.gamma_pos": {"uniform": [0.0, 2.0]},
    "loss.lambda_b": {"loguniform": [0.05, 2.0]}, "loss.lambda_c": {"loguniform": [0.02, 1.0]}})
def _comic(cfg: Config, stats: DataStats) -> Method:
    model = ComicNet(cfg.model, stats.num_classes, stats.input_width)
    return Method(model, losses.ComicCriterion.from_config(cfg, stats.counts_tensor()))


def _register_plain_baselines() -> None:
    """BCE / Focal / ASL / Hill / SPLC / Pseudo-Label: BaselineNet + the loss. DB and DB-Focal also get the observed
    counts and class-aware sampling (their re-balanced weights are designed for class-aware re-sampled batches, as in
    the DB reference); P-ASL gets the observed class frequencies as its prior (the ignore-mode prior of the reference
    is degenerate without annotated negatives)."""
    counts = {"class_counts": lambda s: s.counts_tensor(), "num_images": lambda s: s.num_images}
    for name, loss_cls, space in _PLAIN:
        register(name, _loss_space(space), loss_cls)(_plain(loss_cls))
    # Summed like every other loss here: with Adam and coupled L2, DB's reference mean (the sum / B*C) would make
    # weight decay B*C times stronger relative to its gradient than for the others (loss.baseline.reduction=mean
    # restores the reference).
    db_space = {"mu": [0.05, 0.5], "neg_scale": [0.5, 5.0], "init_bias": [0.01, 0.2]}
    register("db", _loss_space(db_space), losses.DB)(
        _plain(losses.DB, sampler=_class_aware, reduction="sum", **counts))
    register("db-focal", _loss_space(db_space | {"gamma": [0.0, 4.0]}), losses.DBFocal)(
        _plain(losses.DBFocal, sampler=_class_aware, reduction="sum", **counts))
    prior = {"class_prior": lambda s: losses.PartialASL.prior_from_counts(s.counts_tensor(), s.num_images)}
    p_asl = {"gamma_unann": [1.0, 6.0], "prior_threshold": [0.2, 0.8], "likelihood_topk": [1.0, 10.0]}
    register("p-asl", _loss_space(p_asl), losses.PartialASL)(_plain(losses.PartialASL, **prior))


def _loss_space(ranges: dict[str, list[float]]) -> dict[str, Any]:
    """A loss's own parameters (uniform ranges) as `loss.baseline.*` keys."""
    return {f"loss.baseline.{k}": {"uniform": v} for k, v in ranges.items()}


# The plain baselines, their losses and those losses' own parameters (ranges around each paper's defaults).
_PLAIN: tuple[tuple[str, type, dict[str, list[float]]], ...] = (
    ("bce", losses.BCE, {}),
    ("focal", losses.Focal, {"gamma": [0.0, 5.0]}),
    ("asl", losses.ASL, {"gamma_neg": [0.0, 6.0], "gamma_pos": [0.0, 2.0], "clip": [0.0, 0.2]}),
    ("hill", losses.Hill, {"hill_lambda": [1.0, 2.0], "margin": [0.5, 2.0], "gamma": [0.0, 4.0]}),
    ("splc", losses.SPLC, {"tau": [0.5, 0.95], "margin": [0.5, 2.0], "gamma": [0.0, 4.0]}),
    ("pseudo-label", losses.PseudoLabel, {"tau": [0.5, 0.99], "final_weight": [0.1, 1.0]}),
)


_register_plain_baselines()


@register("ml-gcn", loss=losses.BCE)
def _ml_gcn(cfg: Config, stats: DataStats) -> Method:
    """ML-GCN: the classifier comes from a GCN over label embeddings (`model.label_embeddings`) and the correlation
    matrix of the observed training labels (threshold 0.4, p = 0.25); loss BCE."""
    embeddings = load_label_embeddings(cfg.model.label_embeddings, stats.num_classes, seed=cfg.seed)
    model = GCNNet(cfg.model, embeddings, correlation_matrix(stats.train_observed), stats.input_width)
    return Method(model, losses.LossCriterion(losses.BCE(**loss_kwargs(cfg, losses.BCE)), "bce"))


@register("lws", loss=losses.BCE)
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
