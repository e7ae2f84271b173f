"""Training and evaluation: `train_one_epoch`, `evaluate`, and `fit(cfg, report=None)`.

`fit` reads like a table of contents: data -> method -> optimizer -> (resume) -> epochs of train / evaluate /
checkpoint / report. Per epoch it hands one flat metric dict to `report` (the CLI logs it to MLflow, a sweep passes it
to `tune.report`). Validation picks the best epoch; test metrics are logged beside it and never used to pick anything.

The best-on-val epoch's per-image test scores are kept in the work directory (`test_scores.npz`; tracked runs log it
as the MLflow artifact `scores/test_scores.npz`), so that statistics over test images (`comic.report.bootstrap`) need
no retraining:
    scores        [N, C] float32  sigmoid scores of the prediction (float32: the metrics recomputed from the file
                                  equal the logged `best/test/*` exactly)
    targets       [N, C] uint8    full test labels
    image_ids     [N]    str      the test images, in row order
    train_counts  [C]    int64    observed training counts (the run's shot groups)
    epoch         []     int64    the best-on-validation epoch the scores belong to
About 90 KB for 900 images and 20 classes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from comic._io import UserError, atomic_write
from comic.checkpoint import CheckpointPolicy, RunCheckpoint, RunState
from comic.config import Config
from comic.data.build import ensure_benchmark
from comic.data.features import build_feature_loaders, ensure_features
from comic.data.images import build_loaders, class_aware_loader, trunk_preprocess
from comic.data.reader import Benchmark, load_benchmark
from comic.device import Runtime, peak_memory_mb, reset_peak_memory, setup_runtime, synchronize
from comic.meters import CorrectionMeter, LossMeter
from comic.methods import Criterion, DataStats, Method, Model, build_method
from comic.metrics import average_precision, chance_map, evaluate_scores, shot_groups
from comic.progress import progress

log = logging.getLogger(__name__)

FUSED_ADAM_DEVICES = ("cpu", "cuda")
# Extra model outputs scored at evaluation, and the name their metrics carry (Table 1's Head / Tail Model rows: the
# models' predictions after the moving-vector shift, Eq. 9-10).
EXTRA_OUTPUTS = {"z_h_hat": "head", "z_t_hat": "tail"}
TEST_SCORES = "test_scores.npz"
SCORES_ARTIFACT_DIR = "scores"  # where tracked runs log the file in MLflow


@dataclass
class FitResult:
    """What a run leaves: its last epoch's metrics (with best/...), the history and the per-class tables."""

    metrics: dict[str, float]
    history: list[dict[str, float]]
    per_class: dict[str, Any]
    workdir: Path | None
    already_finished: bool = False  # the work directory held a finished run: nothing was trained

    @classmethod
    def of(cls, run: RunState, workdir: Path | None, already_finished: bool = False) -> FitResult:
        return cls(dict(run.history[-1]) if run.history else {}, run.history, run.per_class, workdir,
                   already_finished)


# report(metrics, state) after each epoch's checkpoint: the epoch's flat metrics (with best/...) and the run so far.
Report = Callable[[dict[str, float], RunState], None]


def build_optimizer(model: nn.Module, cfg: Config) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """One Adam over the model's parameter groups (each model/module its own LR) and a per-group step decay.

    Adam state is per parameter and the models are routed apart with `.detach()`, so one Adam over the groups updates
    each model as separate Adams would. Weight decay is coupled L2 (Adam, not AdamW), as in the released code.
    The released code steps its StepLR at the start of each 1-based epoch: with step s, the LR drops at epochs
    s, 2s, ...; so during epoch e (1-based) the factor is gamma ** (e // s).
    """
    groups = model.param_groups(cfg.optim)
    # Fused Adam: one pass over each parameter per step instead of ~10; on a CPU too, where torch's default is the
    # per-tensor loop (about 10x slower per step: benchmarks/optimizer_step.py), which dominated a cached trial.
    fused = all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for g in groups for p in g["params"])
    optimizer = torch.optim.Adam(groups, betas=(cfg.optim.beta1, 0.999), fused=fused or None)
    gamma = cfg.optim.decay_gamma
    lambdas = [lambda e, s=g["step_size"]: gamma ** ((e + 1) // s) for g in groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def make_train_step(model: Model, criterion: Criterion, optimizer: torch.optim.Optimizer, cfg: Config,
                    rt: Runtime) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The per-batch update, written to be capturable: no `.item()`, no branch on tensor values, fixed shapes."""

    def forward_loss(images: torch.Tensor, observed: torch.Tensor):
        with rt.autocast():
            out = model(images)
        return criterion(out, observed)

    if cfg.engine.compile != "none":
        forward_loss = torch.compile(forward_loss, mode=cfg.engine.compile, dynamic=False)
    by_model: dict[str, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        by_model.setdefault(group.get("model", "all"), []).extend(group["params"])
    graphs = cfg.engine.compile == "reduce-overhead" and rt.is_cuda

    def step(images: torch.Tensor, observed: torch.Tensor):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        total, parts = forward_loss(images, observed)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.optim.grad_clip > 0:
            for params in by_model.values():  # per model: a global norm would couple the three models
                nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip, foreach=True)
        optimizer.step()
        return total.detach(), parts

    return step


def train_one_epoch(step: Callable, loader: torch.utils.data.DataLoader, criterion: Criterion, epoch: int,
                    cfg: Config, rt: Runtime, num_classes: int) -> tuple[dict[str, float], CorrectionMeter]:
    """One pass over the training loader; returns mean losses, throughput, memory and the correction tallies."""
    losses, corrections = LossMeter(rt.device), CorrectionMeter(num_classes, rt.device)
    criterion.start_epoch(epoch)
    reset_peak_memory(rt)
    bar = progress(loader, desc=f"epoch {epoch}/{cfg.train.epochs}", unit="batch", leave=False,
                   enabled=cfg.engine.progress)
    images_seen, start = 0, time.perf_counter()
    for i, (images, observed, full) in enumerate(bar):
        observed = observed.to(rt.device, non_blocking=True)
        total, parts = step(rt.inputs_to_device(images), observed)
        losses.add(total, parts)
        if "corrected" in parts:
            corrections.add(parts["corrected"], observed, full.to(rt.device, non_blocking=True))
        images_seen += images.shape[0]
        if (i + 1) % cfg.train.log_interval == 0:
            losses.check_finite(epoch)
            bar.set_postfix(loss=f"{losses.means()['train/loss']:.4g}")
    synchronize(rt)
    elapsed = time.perf_counter() - start
    losses.check_finite(epoch)
    metrics = losses.means() | {"perf/img_per_s": images_seen / max(elapsed, 1e-9), "perf/epoch_s": elapsed,
                                "perf/peak_mem_mb": peak_memory_mb(rt)}
    return metrics, corrections


@torch.inference_mode()
def predict(model: nn.Module, loader: torch.utils.data.DataLoader,
            rt: Runtime) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Sigmoid scores of the outputs that are scored (`logits` and EXTRA_OUTPUTS, where the model has them; [N, C]
    each, keyed by output field) and the full targets [N, C]."""
    model.eval()
    scores: dict[str, list[torch.Tensor]] = {}
    targets = []
    for images, _, full in loader:
        with rt.autocast():
            out = model(rt.inputs_to_device(images))._asdict()
        for name in ("logits", *EXTRA_OUTPUTS):
            if name in out:
                scores.setdefault(name, []).append(torch.sigmoid(out[name].float()).cpu())
        targets.append(full)
    return {k: torch.cat(v).numpy() for k, v in scores.items()}, torch.cat(targets).numpy()


def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, rt: Runtime, train_counts: np.ndarray,
             split: str) -> tuple[dict[str, float], np.ndarray]:
    """mAP (total, many / medium / few, average) and recall of the prediction, plus the head/tail outputs' mAP.

    Returns the flat metrics (`val/map`, `val/head/map`, ...) and the per-class AP [C] of the prediction.
    """
    return score_metrics(*predict(model, loader, rt), train_counts, split)


def score_metrics(scores: dict[str, np.ndarray], targets: np.ndarray, train_counts: np.ndarray,
                  split: str) -> tuple[dict[str, float], np.ndarray]:
    """`evaluate`'s metrics and per-class AP [C] of `predict`'s scores ({output: [N, C]}) and targets [N, C]."""
    metrics = {f"{split}/{k}": v for k, v in evaluate_scores(scores["logits"], targets, train_counts).items()}
    metrics[f"{split}/map_chance"] = chance_map(targets)
    for name, label in EXTRA_OUTPUTS.items():
        if name in scores:
            extra = evaluate_scores(scores[name], targets, train_counts)
            metrics |= {f"{split}/{label}/{k}": v for k, v in extra.items() if k.startswith("map")}
    return metrics, average_precision(scores["logits"], targets)


def _learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    groups = optimizer.param_groups
    # 6 significant digits: the schedule's products (3e-4 * 1.0) print as 0.00030000000000000003 otherwise.
    return {f"train/lr_{str(g.get('name', i)).replace('/', '_')}": float(f"{g['lr']:.6g}")
            for i, g in enumerate(groups)}


def _per_class(bench: Benchmark, val_ap: np.ndarray, test_ap: np.ndarray | None,
               corrections: CorrectionMeter) -> dict:
    """The epoch's per-class table; test AP is NaN at an epoch without a test pass."""
    tally = corrections.per_class()
    test = test_ap if test_ap is not None else np.full(bench.num_classes, np.nan)
    return {"class": list(bench.class_names), "train_observed": bench.train_counts.tolist(),
            "train_full": bench.train.full.sum(0).tolist(), "val_ap": val_ap.tolist(), "test_ap": test.tolist(),
            "rlc_tp": tally["tp"].tolist(), "rlc_fp": tally["fp"].tolist()}


@dataclass
class Setup:
    """Everything `fit` builds before its first epoch."""

    rt: Runtime
    bench: Benchmark
    loaders: dict[str, torch.utils.data.DataLoader]
    method: Method
    objects: dict[str, Any]  # model, criterion, optimizer, scheduler: what a checkpoint saves
    step: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def setup(cfg: Config) -> Setup:
    """Device, benchmark, loaders (of images, or profile frozen: of cached trunk features), method, optimizer."""
    frozen = cfg.model.profile == "frozen"
    rt = setup_runtime(cfg.engine, cfg.seed, workers=0 if frozen else cfg.data.num_workers)
    bench = load_benchmark(ensure_benchmark(cfg.data))
    features = ensure_features(bench, cfg, rt) if frozen else None  # its trunk (and weights) before the pixels
    stats = DataStats(list(bench.class_names), bench.train_counts, bench.train.observed,
                      input_width=features.width if features else None)
    method = build_method(cfg, stats)  # weights load here: an error comes before any image cache is built
    if features is not None:
        loaders = build_feature_loaders(bench, features, cfg.train.batch_size, cfg.seed)
    else:
        loaders = build_loaders(bench, cfg.data, cfg.train.batch_size, cfg.seed, pin_memory=rt.is_cuda,
                                prep=trunk_preprocess(cfg.model, cfg.data.image_size))
    model, criterion = method.model.to(rt.device), method.criterion.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, cfg)
    objects = {"model": model, "criterion": criterion, "optimizer": optimizer, "scheduler": scheduler}
    step = make_train_step(model, criterion, optimizer, cfg, rt)
    return Setup(rt, bench, loaders, method, objects, step)


def _epoch(cfg: Config, s: Setup, epoch: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Train one epoch and evaluate on val (and on test with `train.test_every_epoch`). Returns the epoch's flat
    metrics and its per-class table."""
    model, criterion, optimizer = s.objects["model"], s.objects["criterion"], s.objects["optimizer"]
    train_loader = _train_loader(s.loaders, s.method.hooks.sampler(epoch), cfg.seed, epoch)
    s.method.hooks.start_epoch(epoch)
    metrics = {"epoch": float(epoch)} | _learning_rates(optimizer)
    model.train()
    train_metrics, corrections = train_one_epoch(s.step, train_loader, criterion, epoch, cfg, s.rt,
                                                 s.bench.num_classes)
    val, val_ap = evaluate(model, s.loaders["val"], s.rt, s.bench.train_counts, "val")
    test, test_ap = {}, None
    if cfg.train.test_every_epoch:
        test, test_ap = evaluate(model, s.loaders["test"], s.rt, s.bench.train_counts, "test")
    metrics |= train_metrics | val | test
    if s.bench.has_full_labels and criterion.corrects_labels:
        metrics |= corrections.summary(shot_groups(s.bench.train_counts))
    s.objects["scheduler"].step()
    return metrics, _per_class(s.bench, val_ap, test_ap, corrections)


def _test_best(s: Setup, checkpoint: RunCheckpoint, run: RunState) -> None:
    """The best-on-val epoch's test metrics, measured on its weights once per best epoch: the same numbers as a test
    pass at that epoch, without one at every epoch that improves val/map (test is never used to select)."""
    if run.best_tested:
        return
    with checkpoint.best_weights_in(s.objects["model"], run):
        scores, targets = predict(s.objects["model"], s.loaders["test"], s.rt)
    test, test_ap = score_metrics(scores, targets, s.bench.train_counts, "test")
    if checkpoint.workdir is not None:  # per-image scores: statistics over test images need no retraining
        rows = s.loaders["test"].dataset.rows
        write_test_scores(checkpoint.workdir / TEST_SCORES, scores["logits"], targets,
                          [s.bench.test.image_ids[r] for r in rows], run.best_epoch, s.bench.train_counts)
    run.record_best_test(test, test_ap.tolist())


def fit(cfg: Config, report: Report | None = None, *, workdir: str | Path | None = None,
        policy: CheckpointPolicy | None = None) -> FitResult:
    """Train `cfg.method` on `cfg.data`; checkpoint into `workdir` as `policy` says (default: `train.*`) and resume
    from it when present.

    `report(metrics, run)` is called once per epoch, after the epoch was kept (`run.saved`: on disk), with flat keys
    (`epoch`, `val/map`, `train/loss_mfm_b`, `perf/img_per_s`, ..., and the best-on-val epoch's `best/...`; its
    `best/test/...` from the first checkpoint (or the last epoch) after it became the best).
    """
    workdir = Path(workdir) if workdir is not None else None
    s = setup(cfg)
    checkpoint = RunCheckpoint(cfg, workdir, s.bench.digest, policy)
    run = checkpoint.restore(s.objects)
    with checkpoint.guard():
        for epoch in range(run.epoch + 1, cfg.train.epochs + 1):
            run.record(*_epoch(cfg, s, epoch))
            save = checkpoint.due(epoch, last=epoch == cfg.train.epochs)
            if save:  # a checkpoint carries its best epoch's test metrics
                _test_best(s, checkpoint, run)
            checkpoint.end_epoch(s.objects, run, save)
            if report is not None:
                report(run.history[-1], run)
    return FitResult.of(run, workdir)


def _train_loader(loaders: dict[str, torch.utils.data.DataLoader], sampler: str, seed: int,
                  epoch: int) -> torch.utils.data.DataLoader:
    """The epoch's training loader (random or class-aware sampling), reseeded so that the data order of epoch e
    depends on (seed, e) only: a resumed run sees the same batches."""
    if sampler not in ("random", "class-aware"):
        raise ValueError(f"unknown sampler {sampler!r} requested by the method's hooks")
    if sampler == "class-aware" and "train_class_aware" not in loaders:
        loaders["train_class_aware"] = class_aware_loader(loaders["train"], seed)
    loader = loaders["train" if sampler == "random" else "train_class_aware"]
    loader.generator.manual_seed(seed * 100_003 + epoch)
    return loader


# --------------------------------------------------------------------------------------------- test scores


@dataclass(frozen=True, eq=False)
class BestTestScores:
    """One run's test scores: scores [N, C], targets [N, C], image_ids [N], train_counts [C], epoch."""

    scores: np.ndarray
    targets: np.ndarray
    image_ids: tuple[str, ...]
    train_counts: np.ndarray
    epoch: int


def write_test_scores(path: Path, scores: np.ndarray, targets: np.ndarray, image_ids: Sequence,
                      epoch: int, train_counts: np.ndarray) -> Path:
    """Write the file atomically (a crash never leaves half of it)."""
    arrays = {"scores": np.asarray(scores, dtype=np.float32), "targets": np.asarray(targets, dtype=np.uint8),
              "image_ids": np.asarray([str(i) for i in image_ids]), "epoch": np.int64(epoch),
              "train_counts": np.asarray(train_counts, dtype=np.int64)}

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:  # a file object: np.savez would append '.npz' to a path without it
            np.savez_compressed(fh, **arrays)

    return atomic_write(path, write)


def read_test_scores(path: Path) -> BestTestScores:
    """Read the file; UserError naming it when it is missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            out = BestTestScores(data["scores"], data["targets"], tuple(str(i) for i in data["image_ids"]),
                             data["train_counts"], int(data["epoch"]))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: missing or damaged test scores ({err}); rerun the cell to write it again") from err
    if out.scores.shape != out.targets.shape or out.scores.shape[0] != len(out.image_ids):
        raise UserError(f"{path}: scores {out.scores.shape}, targets {out.targets.shape} and "
                        f"{len(out.image_ids)} image ids do not agree")
    return out
