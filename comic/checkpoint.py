"""Checkpoints: atomic save, safe load (`weights_only=True`), RNG state capture for exact resume."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comic._io import UserError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "state.pt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, or one of another run; the message names the file and the way out."""


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `directory/state.pt` atomically (temp file, then rename): a crash never leaves half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT_NAME
    tmp = directory / f".{CHECKPOINT_NAME}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, final)
    return final


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state saved in `directory`, or None when there is none. Only tensors and plain containers are unpickled."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} could not be read ({type(err).__name__}: {err}); delete it to "
                              "start the run afresh") from err


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
