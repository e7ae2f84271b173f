"""Multi-label class-aware sampler (issue 7): determinism, uniform class frequencies, empty rows and classes."""

from __future__ import annotations

import numpy as np
import torch

from comic.data.sampler import ClassAwareSampler

CLASS_SIZES = [512, 256, 128, 64, 32, 16, 8, 4]  # long-tailed, 1,020 images
DRAWS = 16_000


def single_label_long_tail() -> np.ndarray:
    """[1020, 8]: one positive per image, class c on CLASS_SIZES[c] images, rows shuffled."""
    classes = np.repeat(np.arange(len(CLASS_SIZES)), CLASS_SIZES)
    np.random.default_rng(0).shuffle(classes)
    return np.eye(len(CLASS_SIZES), dtype=np.uint8)[classes]


def class_shares(labels: np.ndarray, indices: list[int]) -> np.ndarray:
    return labels[indices].sum(axis=0) / len(indices)


def roughly_uniform(shares: np.ndarray) -> bool:
    # Expected 1/8 = 2,000 draws per class; binomial sd ~ 42 draws, so +-15 % (300 draws) is a 7-sd margin.
    return bool(np.all(np.abs(shares - 1 / len(shares)) <= 0.15 / len(shares)))


def test_deterministic_from_generator() -> None:
    labels = single_label_long_tail()
    first = list(ClassAwareSampler(labels, generator=torch.Generator().manual_seed(3)))
    again = list(ClassAwareSampler(labels, generator=torch.Generator().manual_seed(3)))
    other = list(ClassAwareSampler(labels, generator=torch.Generator().manual_seed(4)))
    assert first == again and first != other
    sampler = ClassAwareSampler(labels, generator=torch.Generator().manual_seed(3))
    assert list(sampler) == first and list(sampler) != first  # the next epoch continues the generator's stream


def test_length_defaults_to_dataset_size() -> None:
    labels = single_label_long_tail()
    assert len(ClassAwareSampler(labels)) == len(labels) == len(list(ClassAwareSampler(labels)))
    assert len(list(ClassAwareSampler(labels, num_samples=37))) == 37


def test_class_frequencies_uniform_unlike_random_sampling() -> None:
    labels = single_label_long_tail()
    generator = torch.Generator().manual_seed(0)
    balanced = list(ClassAwareSampler(labels, num_samples=DRAWS, generator=generator))
    assert roughly_uniform(class_shares(labels, balanced))
    # Contrast: plain uniform sampling over images follows the long tail (head ~50 %, tail ~0.4 %) and fails.
    plain = torch.randint(len(labels), (DRAWS,), generator=torch.Generator().manual_seed(0)).tolist()
    shares = class_shares(labels, plain)
    assert not roughly_uniform(shares) and shares[0] > 0.4 and shares[-1] < 0.01


def test_multi_label_tail_gets_its_share() -> None:
    # Multi-label: the rare class (5 images) is picked ~1/C of the time, so >= 1/C of draws contain it.
    rng = np.random.default_rng(1)
    labels = (rng.random((400, 5)) < [0.6, 0.3, 0.1, 0.05, 0.0]).astype(np.uint8)
    labels[:5, 4] = 1
    drawn = list(ClassAwareSampler(labels, num_samples=5_000, generator=torch.Generator().manual_seed(0)))
    assert class_shares(labels, drawn)[4] >= 0.8 / 5  # random sampling would give 5 / 400 = 1.25 %


def test_empty_rows_and_classes_never_drawn() -> None:
    labels = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])  # class 2 empty, rows 1 and 4 empty
    drawn = set(ClassAwareSampler(labels, num_samples=2_000, generator=torch.Generator().manual_seed(0)))
    assert drawn == {0, 2, 3}
