"""A run's state on disk, owned by one object: `RunCheckpoint` (identity, progress, best weights; when and what is
written, and how it is read back).

A run's work directory holds, under `checkpoint/`:
    state.pt   the resumable state of the last checkpointed epoch: trainable weights and buffers, optimizer, criterion,
               scheduler, every RNG, the run's progress (`RunState`), its identity and config. Frozen parameters (a
               frozen trunk) are never written: they are re-created from the weights whose hash is in the identity.
    best.pt    the best-on-validation epoch's trainable weights and buffers, its epoch, metrics and config: the model
               every reported number comes from.
When (`CheckpointPolicy`): every `train.checkpoint_every_s` seconds, at the last epoch, at chosen epochs (the epochs
where Ray Tune's ASHA may stop a trial), and on an interrupt (Ctrl-C, SIGTERM, an exception): the last finished
epoch's state, copied in memory at every epoch end for that purpose, is written then. A resume is exact from any of
them. Files are read with `weights_only=True` (tensors and plain containers only) and memory-mapped, so reading a
run's progress does not read its weights.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from comic._io import GUARD, SigtermHandler, UserError, atomic_write
from comic.config import Config, identity_hash, to_dict
from comic.models.backbone import weights_id

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_NAME = "state.pt"
BEST_NAME = "best.pt"
FORMAT = 2  # 1: whole state dicts, frozen trunk included, every epoch
SELECTION_METRIC = "val/map"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, or one of another run; the message names the file and the way out."""


# ------------------------------------------------------------------------------------------------ progress


@dataclass
class RunState:
    """Progress that a checkpoint must carry for an exact resume: every epoch's metrics, the best-on-val epoch's
    metrics and the per-class tables of the best and the last epoch. `saved` (not stored): whether the current
    epoch's state is on disk."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, Any] = field(default_factory=dict)
    saved: bool = False

    def record(self, metrics: dict[str, float], per_class: dict[str, Any]) -> dict[str, float]:
        """Append the epoch; keep it as best when val/map improves (NaN never wins). Returns the epoch's metrics with
        the best epoch's so far under `best/...` (what is reported every epoch)."""
        metrics = {k: float(v) for k, v in metrics.items()}  # plain floats: checkpoints load with weights_only
        self.epoch, self.saved = int(metrics["epoch"]), False
        if self.improves(metrics.get(SELECTION_METRIC, math.nan)):
            self.best = dict(metrics)
            self.per_class["best"] = per_class
        self.per_class["last"] = per_class
        self.history.append(metrics | self.best_metrics())
        return self.history[-1]

    def improves(self, score: float) -> bool:
        """Whether an epoch with this val/map becomes the best one: the first epoch, or a strictly higher score."""
        return not self.best or (not math.isnan(score) and score > self.best.get(SELECTION_METRIC, -math.inf))

    @property
    def best_epoch(self) -> int:
        return int(self.best.get("epoch", 0))

    @property
    def best_tested(self) -> bool:
        """Whether the best epoch's test metrics are known (measured at that epoch or later on its weights)."""
        return any(k.startswith("test/") for k in self.best)

    def record_best_test(self, test: dict[str, float], test_ap: list[float]) -> dict[str, float]:
        """The best epoch's test metrics and per-class test AP, measured on its weights; the last epoch's row shows
        them under `best/test/...`."""
        self.best |= {k: float(v) for k, v in test.items()}
        self.per_class["best"] = self.per_class["best"] | {"test_ap": test_ap}
        self.history[-1] = self.history[-1] | self.best_metrics()
        return self.history[-1]

    def best_metrics(self) -> dict[str, float]:
        """The best-on-val epoch's `epoch`, its prediction's `val/map*` and all its `test/*` metrics (head / tail
        models included: Table 1's rows) under `best/...`; the sub-models' val metrics stay in the curves."""
        return {f"best/{k}": v for k, v in self.best.items()
                if k == "epoch" or (k.startswith(("val/map", "test/")) and k != "val/map_chance")}

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history, "best": self.best, "per_class": self.per_class}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RunState:
        return cls(int(state["epoch"]), list(state["history"]), dict(state["best"]), dict(state["per_class"]))

    def copy(self) -> RunState:
        """A copy that later epochs do not change (entries are appended or replaced, never mutated)."""
        return RunState(self.epoch, list(self.history), dict(self.best), dict(self.per_class), self.saved)


def run_identity(cfg: Config, dataset_digest: str) -> str:
    """What a checkpoint must match to be resumed: the run's resumable identity, the benchmark's content, the trunk
    weights' hash (frozen parameters are re-created from them, never saved) and the checkpoint format."""
    return identity_hash(cfg, resumable=True, dataset=dataset_digest, trunk=weights_id(cfg.model), format=FORMAT)


# ------------------------------------------------------------------------------------------------ files


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `directory/state.pt` atomically: a crash never leaves half a file."""
    return atomic_write(Path(directory) / CHECKPOINT_NAME, lambda tmp: torch.save(state, tmp))


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu", name: str = CHECKPOINT_NAME,
                    mmap: bool = False) -> dict[str, Any] | None:
    """The state saved in `directory/name`, or None when there is none. Only tensors and plain containers are
    unpickled. `mmap`: tensors are mapped, read from disk only when used (reading a run's progress is cheap)."""
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} could not be read ({type(err).__name__}: {err}); delete it to "
                              "start the run afresh") from err


def frozen_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> frozenset[str]:
    """The model's parameters that no optimizer group holds (a frozen trunk): they never change, so no checkpoint
    holds them; they are re-created from the weights the run's identity names. (Not `requires_grad`: LWS freezes
    trained layers for its second stage, and those must be kept.)"""
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return frozenset(name for name, p in model.named_parameters() if id(p) not in trained)


def trainable_state(model: nn.Module, frozen: frozenset[str]) -> dict[str, torch.Tensor]:
    """`model`'s state dict without its `frozen` parameters: every trained parameter and every buffer (the running
    statistics of a frozen trunk's train-mode BatchNorm do change)."""
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], frozen: frozenset[str],
                         origin: Path | str) -> None:
    """Load what `trainable_state` saved; exactly the `frozen` parameters stay as they are."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{origin} does not fit this model ({err}); use a new work directory") from err
    if unexpected or set(missing) != frozen:
        raise CheckpointError(f"{origin} does not fit this model (missing {sorted(set(missing) - frozen)[:5]}, "
                              f"unexpected {unexpected[:5]}); use a new work directory")


def rng_state() -> dict[str, Any]:
    """Every RNG a training epoch draws from, in a form `weights_only` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _copy_into(old: Any, new: Any) -> Any:
    """A deep copy of `new` (nested dicts / lists of tensors and plain values) that reuses `old`'s tensors where they
    fit: copying into memory already touched is several times faster than allocating it afresh every epoch."""
    if isinstance(new, torch.Tensor):
        fits = isinstance(old, torch.Tensor) and (old.shape, old.dtype, old.device) == (new.shape, new.dtype,
                                                                                      new.device)
        return old.copy_(new) if fits else new.detach().clone()
    if isinstance(new, dict):
        old = old if isinstance(old, dict) else {}
        return {k: _copy_into(old.get(k), v) for k, v in new.items()}
    if isinstance(new, (list, tuple)):
        old = old if isinstance(old, (list, tuple)) and len(old) == len(new) else [None] * len(new)
        return type(new)(_copy_into(o, v) for o, v in zip(old, new, strict=True))
    return copy.deepcopy(new)


def _states(objects: dict[str, Any], frozen: frozenset[str]) -> dict[str, Any]:
    """The state of every training object; the model without its frozen parameters."""
    return {name: trainable_state(obj, frozen) if name == "model" else obj.state_dict()
            for name, obj in objects.items()}


# ------------------------------------------------------------------------------------------------ the owner


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a finished epoch is written: every `every_s` seconds of training (0: every epoch), at `epochs`, and
    always at the last epoch. Between two checkpoints a crash costs at most `every_s` of work; an interrupt costs
    none (the last finished epoch is written on the way out)."""

    every_s: float = 60.0
    epochs: frozenset[int] = frozenset()

    @classmethod
    def of(cls, cfg: Config, epochs: tuple[int, ...] | frozenset[int] = ()) -> CheckpointPolicy:
        return cls(cfg.train.checkpoint_every_s, frozenset(epochs))

    def due(self, epoch: int, last: bool, since_s: float) -> bool:
        return last or epoch in self.epochs or since_s >= self.every_s


class RunCheckpoint:
    """The one owner of a run's state in its work directory (`workdir` None: nothing is kept).

    `check` refuses another run's checkpoint; `finished` reads a finished run's progress without its weights;
    `restore` loads the training objects (`{"model", "criterion", "optimizer", "scheduler"}`) and returns the progress;
    `end_epoch` keeps the epoch (in memory, on disk when the policy says so, and the best weights when val/map
    improved); inside `guard()` an interrupt writes the last finished epoch before it propagates.
    """

    clock = staticmethod(time.monotonic)

    def __init__(self, cfg: Config, workdir: str | Path | None, dataset_digest: str,
                 policy: CheckpointPolicy | None = None) -> None:
        self.folder = Path(workdir) / CHECKPOINT_DIR if workdir is not None else None
        self.cfg, self.dataset_digest = cfg, dataset_digest
        self.policy = policy or CheckpointPolicy.of(cfg)
        self._pending: dict[str, Any] | None = None  # the last finished epoch, when it is not on disk yet
        self._best: dict[str, Any] | None = None  # the best epoch's weights, when they are not on disk yet
        self._buffers: dict[str, Any] = {}  # tensors the copies reuse
        self._frozen: frozenset[str] = frozenset()  # the model's parameters never written (set by `restore`)
        self._written_at = self.clock()

    @functools.cached_property
    def identity(self) -> str:
        """`run_identity`, computed when first needed: a missing weights file is then the run's own error (inside
        its MLflow run), not one raised before it starts."""
        return run_identity(self.cfg, self.dataset_digest)

    @property
    def workdir(self) -> Path | None:
        """The run's work directory (None: a run that keeps nothing on disk)."""
        return self.folder.parent if self.folder is not None else None

    @property
    def best_path(self) -> Path | None:
        return self.folder / BEST_NAME if self.folder is not None else None

    # ---------------------------------------------------------------- reading

    def _read(self, mmap: bool) -> dict[str, Any] | None:
        state = load_checkpoint(self.folder, mmap=mmap) if self.folder is not None else None
        if state is not None and state.get("identity") != self.identity:
            old = "" if state.get("format") == FORMAT else " (or one written by an older version of comic)"
            raise CheckpointError(f"{self.folder.parent} holds a checkpoint of a different run (another "
                                  f"configuration or benchmark{old}); use a new work directory or the same settings")
        return state

    def check(self) -> None:
        """Raise CheckpointError when the work directory holds another run's checkpoint."""
        self._read(mmap=True)

    def finished(self, epochs: int) -> RunState | None:
        """The progress of this run when all `epochs` are on disk, else None (weights are not read)."""
        state = self._read(mmap=True)
        if state is None or state["run"]["epoch"] < epochs:
            return None
        return RunState.from_dict(state["run"])

    def restore(self, objects: dict[str, Any]) -> RunState:
        """Load the checkpoint, if there is one, into `objects`; its progress (a fresh RunState otherwise). Call it
        before the first epoch."""
        self._frozen = frozen_names(objects["model"], objects["optimizer"])
        state = self._read(mmap=False)
        if state is None:
            return RunState()
        path = self.folder / CHECKPOINT_NAME
        for name, obj in objects.items():
            if name == "model":
                load_trainable_state(obj, state["objects"][name], self._frozen, path)
            else:
                obj.load_state_dict(state["objects"][name])
        run = RunState.from_dict(state["run"])
        run.saved = True
        set_rng_state(state["rng"])
        self._settle_best(run)
        log.info("resumed from %s after epoch %d", self.folder, run.epoch)
        return run

    def _settle_best(self, run: RunState) -> None:
        """A best file written just before a crash cut the state's write is the resumed run's only when the state
        says so."""
        pending = self.folder / f"{BEST_NAME}.next"
        if pending.is_file():
            header = load_checkpoint(self.folder, name=pending.name, mmap=True) or {}
            if header.get("epoch") == run.best_epoch:
                os.replace(pending, self.best_path)
            else:
                pending.unlink()

    # ---------------------------------------------------------------- writing

    def due(self, epoch: int, last: bool) -> bool:
        """Whether the epoch just finished goes to disk (always the last one, and nothing without a work dir)."""
        return last or (self.folder is not None and self.policy.due(epoch, last, self.clock() - self._written_at))

    def end_epoch(self, objects: dict[str, Any], run: RunState, save: bool) -> bool:
        """Keep the epoch `run` just recorded: on disk when `save`, else a copy in memory (what an interrupt writes);
        the best weights too when val/map improved. Sets and returns `run.saved`."""
        with GUARD.call():  # a SIGTERM waits until the epoch is kept whole
            self._pending = None  # until the copies are whole, an interrupt leaves the last written epoch as it is
            if run.best_epoch == run.epoch:
                self._best = None
                best = {"epoch": run.epoch, "model": trainable_state(objects["model"], self._frozen)}
                self._best = best if save else self._copy("best", best)
            if self.folder is None:
                return False
            state = {"run": run.copy(), "rng": rng_state(), "objects": _states(objects, self._frozen)}
            self._pending = state if save else self._copy("state", state)
            if save:
                self._write()
        run.saved = self._pending is None
        return run.saved

    @contextlib.contextmanager
    def best_weights_in(self, model: nn.Module, run: RunState) -> Iterator[None]:
        """The best epoch's weights in `model` for the block; its current weights are back after it."""
        if run.best_epoch == run.epoch:
            yield
            return
        kept = self._best if self._best is not None and self._best["epoch"] == run.best_epoch else None
        best = kept["model"] if kept is not None else load_best(self.folder.parent)["model"]
        current = self._copy("current", trainable_state(model, self._frozen))
        load_trainable_state(model, best, self._frozen, "the best epoch's weights")
        try:
            yield
        finally:
            load_trainable_state(model, current, self._frozen, "the current weights")



    def _copy(self, name: str, obj: Any) -> Any:
        self._buffers[name] = _copy_into(self._buffers.get(name), obj)
        return self._buffers[name]

    def _write(self) -> None:
        """Write the pending epoch: the best weights first (as `best.pt.next`), then the state, then the best file
        renamed into place; a crash between two steps leaves a pair that `restore` settles."""
        header = {"format": FORMAT, "identity": self.identity, "config": to_dict(self.cfg),
                  "frozen": sorted(self._frozen)}
        pending = self._pending
        run: RunState = pending["run"]
        if self._best is not None:
            best = header | self._best | {"metrics": run.best_metrics()}
            atomic_write(self.folder / f"{BEST_NAME}.next", lambda tmp: torch.save(best, tmp))
        save_checkpoint(self.folder, header | pending | {"run": run.to_dict()})
        if self._best is not None:
            os.replace(self.folder / f"{BEST_NAME}.next", self.best_path)
            self._best = None
        self._pending, self._written_at = None, self.clock()

    def flush(self) -> None:
        """Write the last finished epoch if it is not on disk yet (on an interrupt); errors are logged, not raised:
        the interrupt that called this is what the caller must see."""
        if self._pending is None:
            return
        epoch = self._pending["run"].epoch
        try:
            with GUARD.call():
                self._write()
            log.info("interrupted: epoch %d saved in %s", epoch, self.folder)
        except Exception:
            log.exception("could not save the last finished epoch in %s", self.folder)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """The training loop's block: an exception, Ctrl-C or SIGTERM ending it writes the last finished epoch."""
        handler = SigtermHandler(lambda signum: self.flush())
        handler.install()
        try:
            yield
        except BaseException:
            self.flush()
            raise
        finally:
            handler.uninstall()


def load_best(workdir: str | Path) -> dict[str, Any]:
    """A run's best-on-validation weights (`model`: trainable weights and buffers), with its `epoch`, `metrics`
    (best/...), `config` and `identity`; CheckpointError naming the file when there is none."""
    folder = Path(workdir) / CHECKPOINT_DIR
    best = load_checkpoint(folder, name=BEST_NAME)
    if best is None:
        raise CheckpointError(f"{folder / BEST_NAME} does not exist: the run in {workdir} has not finished an epoch")
    return best
