"""Where and how a run executes: device, mixed precision, seeds, determinism, threads, memory readings."""

from __future__ import annotations

import contextlib
import os
import random
import resource
from dataclasses import dataclass

import numpy as np
import torch

from comic.config import EngineConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision
    channels_last: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W] -> on the device, channels_last on CUDA (faster convolutions with bf16)."""
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def device_name(device: torch.device) -> str:
    """The card's name on CUDA ('NVIDIA H100 80GB HBM3'), else 'cpu' (a run's `device` tag)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; asking for CUDA without one is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"engine.device={name!r} but CUDA is not available; use engine.device=cpu or auto")
    return device


def setup_runtime(cfg: EngineConfig, seed: int) -> Runtime:
    """Seed every RNG, apply threads/determinism, and pick device and precision."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace for deterministic GEMMs; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        # cuDNN autotuning picks the fastest convolution kernels for the fixed batch shape (non-deterministic).
        torch.backends.cudnn.benchmark = True
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    device = resolve_device(cfg.device)
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    return Runtime(device, torch.bfloat16 if amp else None, cfg.channels_last and device.type == "cuda")


def reset_peak_memory(rt: Runtime) -> None:
    if rt.is_cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)


def peak_memory_mb(rt: Runtime) -> float:
    """Peak device memory since the last reset on CUDA; peak resident set size of the process on CPU."""
    if rt.is_cuda:
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def synchronize(rt: Runtime) -> None:
    if rt.is_cuda:
        torch.cuda.synchronize(rt.device)
