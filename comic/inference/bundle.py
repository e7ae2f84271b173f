"""`ModelBundle`: a run's best-on-validation model as one file, and the network it rebuilds (image -> scores).

The file (`torch.save` of tensors and plain data, so `torch.load(weights_only=True)` reads it) holds the run's config,
the full state of the method's network (a frozen trunk included: no weights file or hub cache is needed to use it),
for profile `frozen` the trunk whose features the heads were trained on, the class names and training counts, the
per-class decision thresholds and the run's provenance. Evaluation preprocessing is the training run's own
(`comic.data.images.load_eval_pixels` with the trunk's preprocessing at `data.image_size`: `ModelBundle.preprocess`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from comic import engine
from comic._io import UserError, atomic_write
from comic.checkpoint import load_best, load_trainable_state
from comic.config import Config, apply_overrides, from_dict, to_dict
from comic.data.features import frozen_trunk
from comic.data.images import Preprocess, trunk_preprocess
from comic.inference.thresholds import RULE, f1_thresholds
from comic.methods import DataStats, build_method
from comic.models.backbone import build_trunk

BUNDLE_FORMAT = 1
BUNDLE_FILE = "comic_model.pt"


class BundleError(UserError):
    """A model file is missing, damaged or of another format; the message names it."""


class ImageClassifier(nn.Module):
    """images [B, 3, S, S] (normalised) -> the method's output (a NamedTuple whose `logits` [B, C] is the prediction).

    Profile `frozen`: `trunk` computes the features, rounded through float16 as the feature cache stores them (the
    heads were trained and selected on those), then the heads; other profiles: the network holds its trunk(s).
    """

    def __init__(self, model: nn.Module, trunk: nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.trunk = model, trunk

    def forward(self, images: Tensor):
        if self.trunk is None:
            return self.model(images)
        return self.model(self.trunk(images).to(torch.float16).float())


@dataclass
class ModelBundle:
    config: dict[str, Any]
    class_names: list[str]
    train_counts: list[int]
    train_observed: dict[str, Any]  # {'bits': uint8 [ceil(N*C/8)], 'shape': [N, C]}: GCN's label co-occurrence
    thresholds: list[float]
    model: dict[str, Tensor]
    trunk: dict[str, Tensor] | None = None
    threshold_rule: str = RULE
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> Config:
        return from_dict(self.config)

    @property
    def image_size(self) -> int:
        return int(self.config["data"]["image_size"])

    def preprocess(self) -> Preprocess:
        """The pixels the training run's evaluation splits saw (the trunk's resize, interpolation, normalisation)."""
        cfg = self.cfg
        return trunk_preprocess(cfg.model, cfg.data.image_size)

    def save(self, path: str | Path) -> Path:
        """Write the bundle to `path` atomically (a crash never leaves half a model)."""
        payload = {"format": BUNDLE_FORMAT} | asdict(self)
        return atomic_write(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        """Read a bundle; BundleError naming the file when it is missing, damaged or of another format."""
        path = Path(path)
        if path.is_dir():
            path = path / BUNDLE_FILE
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as err:
            raise BundleError(f"{path}: no such model file") from err
        except Exception as err:  # truncated or not a torch file: pickle / zip errors of many kinds
            raise BundleError(f"{path}: not a readable COMIC model file ({err})") from err
        if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise BundleError(f"{path}: model file format {found!r}, this code reads {BUNDLE_FORMAT}")
        payload.pop("format")
        return cls(**payload)

    def stats(self, input_width: int | None) -> DataStats:
        shape = self.train_observed["shape"]
        bits = np.unpackbits(self.train_observed["bits"].numpy())[: shape[0] * shape[1]].reshape(shape)
        return DataStats(list(self.class_names), np.asarray(self.train_counts), bits, input_width=input_width)

    def network(self) -> ImageClassifier:
        """The trained network in eval mode, built from the config without reading any weights file."""
        cfg = apply_overrides(self.cfg, {"model.weights": "none"})  # every weight comes from the bundle
        trunk = None
        if self.trunk is not None:
            trunk, width = build_trunk(cfg.model)
            trunk.load_state_dict(self.trunk)
        model = build_method(cfg, self.stats(width if trunk is not None else None)).model
        model.load_state_dict(self.model)
        return ImageClassifier(model, trunk).eval().requires_grad_(False)


def export_run(cfg: Config, workdir: str | Path, run_id: str | None = None) -> ModelBundle:
    """The bundle of the run in `workdir`: its best-on-val weights, thresholds chosen on its validation split."""
    setup = engine.setup(cfg)
    best = load_best(workdir)
    model = setup.objects["model"]
    load_trainable_state(model, best["model"], frozenset(best["frozen"]), Path(workdir) / "checkpoint")
    scores, targets = engine.predict(model, setup.loaders["val"], setup.rt)
    trunk = frozen_trunk(cfg, setup.rt)[0].cpu().state_dict() if cfg.model.profile == "frozen" else None
    observed = np.asarray(setup.bench.train.observed, dtype=np.uint8)
    provenance = {"run_id": run_id or "", "benchmark": setup.bench.card.get("name", ""),
                  "benchmark_digest": setup.bench.digest, "epoch": int(best["epoch"]),
                  "metrics": {k: float(v) for k, v in best["metrics"].items()},
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return ModelBundle(
        config=to_dict(cfg), class_names=list(setup.bench.class_names),
        train_counts=[int(c) for c in setup.bench.train_counts],
        train_observed={"bits": torch.from_numpy(np.packbits(observed)), "shape": list(observed.shape)},
        thresholds=f1_thresholds(scores["logits"], targets).tolist(),
        model={k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, trunk=trunk,
        provenance=provenance)
