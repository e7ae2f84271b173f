"""Where and how a run executes: device, mixed precision, seeds, determinism, threads, memory readings."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import platform
import random
import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from comic.config import EngineConfig

log = logging.getLogger(__name__)
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


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

    def inputs_to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (channels_last on CUDA: faster convolutions with bf16) or features [B, D] -> device."""
        inputs = inputs.to(self.device, non_blocking=True)
        if self.channels_last and inputs.dim() == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs


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


def owned_cpus() -> tuple[int, str]:
    """How many CPUs this process may use, and why: a Ray trial's CPUs (Ray sets OMP_NUM_THREADS to them), else the
    smaller of the CPU affinity and a cgroup quota (containers)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS (a Ray trial's CPUs)"
    cpus, why = len(os.sched_getaffinity(0)), "the CPU affinity"
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max" and math.ceil(int(quota) / int(period)) < cpus:
            cpus, why = math.ceil(int(quota) / int(period)), "the cgroup CPU quota"
    except (OSError, ValueError):  # no cgroup v2 limit here
        pass
    return cpus, why


def set_threads(cfg: EngineConfig, workers: int) -> int:
    """torch's CPU threads: `engine.threads`, or (0) the CPUs this process owns less its DataLoader workers, so that
    two processes on a small machine do not oversubscribe it (torch's default takes every core). Logged."""
    if cfg.threads > 0:
        threads, why = cfg.threads, "engine.threads"
    else:
        cpus, source = owned_cpus()
        threads, why = max(1, cpus - workers), f"{cpus} CPUs from {source}, less {workers} DataLoader workers"
    torch.set_num_threads(threads)
    log.info("torch threads: %d (%s)", threads, why)
    return threads


def runtime(cfg: EngineConfig) -> Runtime:
    """Device, precision and memory format of `cfg` (no side effects)."""
    device = resolve_device(cfg.device)
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    return Runtime(device, torch.bfloat16 if amp else None, cfg.channels_last and device.type == "cuda")


def keep_freed_memory() -> None:
    """Keep memory that freed tensors held in the process, for the next step's tensors of the same sizes.

    glibc hands a freed block above its mmap threshold (and a free top of the heap above its trim threshold) back to
    the OS at once, so every training step's gradients and activations fault their pages in again: measured on a
    cached COMIC trial, ~2,000 page faults and a fifth of each step (benchmarks/trial_cost.py). Raising both thresholds
    (the mmap one to its 32 MiB ceiling) makes such blocks reusable. A no-op where the C library is not glibc.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    except (OSError, AttributeError) as err:  # a static or unusual libc: nothing to tune
        log.debug("mallopt unavailable: %s", err)


def setup_runtime(cfg: EngineConfig, seed: int, workers: int = 0) -> Runtime:
    """Seed every RNG, apply threads (see `set_threads`), allocator settings and determinism, and pick device and
    precision."""
    set_threads(cfg, workers)
    keep_freed_memory()
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
    return runtime(cfg)


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
