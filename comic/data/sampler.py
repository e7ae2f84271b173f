"""Multi-label class-aware sampling, as used by DB (Wu et al., ECCV 2020) and LWS stage 2 (Kang et al., ICLR 2020).

Each draw picks a class uniformly among the classes with at least one observed positive, then an image labelled
with that class uniformly. Draws are independent. The DB reference instead
cycles through a shuffled class order and takes 3 consecutive images per class; both give every class the same
expected share of draws, which is what the methods rely on. Classes with no observed positive are never picked and
images with no observed positive are never drawn (they are reachable through no class).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

log = logging.getLogger(__name__)

__all__ = ["ClassAwareSampler"]


class ClassAwareSampler(Sampler[int]):
    """Sampler of image indices for a dataset with observed labels [N, C] (0/1; numpy array or tensor).

    num_samples: draws per epoch (default N, the dataset size). generator: the torch.Generator that makes the draws
    (each `iter()` advances it, so epochs differ but the whole sequence is fixed by the generator's seed); None =
    a fresh generator seeded from torch's global RNG at each `iter()`, like `RandomSampler`.
    """

    def __init__(self, labels: np.ndarray | torch.Tensor, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        positive = torch.as_tensor(np.asarray(labels)) > 0
        if positive.dim() != 2:
            raise ValueError(f"labels must be an [N, C] matrix, got shape {tuple(positive.shape)}")
        class_sizes = positive.sum(dim=0)
        self.classes = torch.nonzero(class_sizes > 0).flatten()
        if self.classes.numel() == 0:
            raise ValueError("no class has an observed positive: nothing to sample")
        # CSR layout: the images of class c are members[offsets[c] : offsets[c] + sizes[c]].
        self.members = torch.nonzero(positive.T)[:, 1]
        self.sizes = class_sizes
        self.offsets = torch.cumsum(class_sizes, dim=0) - class_sizes
        self.num_samples = positive.shape[0] if num_samples is None else num_samples
        if self.num_samples <= 0:
            raise ValueError(f"num_samples {self.num_samples!r}: must be positive")
        self.generator = generator
        skipped = positive.shape[1] - self.classes.numel()
        if skipped:
            log.info("class-aware sampler: %d of %d classes have no observed positive and are never drawn",
                     skipped, positive.shape[1])

    def __iter__(self) -> Iterator[int]:
        generator = self.generator
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        picked = self.classes[torch.randint(self.classes.numel(), (self.num_samples,), generator=generator)]
        uniform = torch.rand(self.num_samples, generator=generator, dtype=torch.float64)
        sizes = self.sizes[picked]
        # floor(u * size) is uniform on {0..size-1}; the clamp guards the u -> 1 rounding edge.
        rank = torch.minimum((uniform * sizes).long(), sizes - 1)
        yield from self.members[self.offsets[picked] + rank].tolist()

    def __len__(self) -> int:
        return self.num_samples
