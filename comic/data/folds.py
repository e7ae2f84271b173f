"""Disjoint test folds of one source pool (`data.folds = k`, `data.fold = i`): claims checked on k test sets.

With folds, the images of a source's pool and of its test set together form one pool (an image in both counts
once). A seeded permutation of that pool (`split_seed`) is cut into k nearly equal parts; part i is fold i's test
set, and the other k − 1 parts are fold i's training pool, from which the build draws its train images (long-tail
subsample, missing labels) and its validation split exactly as it does without folds. So fold i's test images are
never in its train or val split, the k test sets are disjoint and together cover the pool, and every fold of a
source shares one partition.

Each image keeps the labelling rule of the split it plays: the pool's rule in the training pool (VOC: flags 1 or 0,
difficult counted), the test set's rule in the test fold (VOC: flag 1). Both rules are read over both source
splits. File names become relative to the folder the two image roots share (`train/x.jpg`, `test/y.jpg` for
coco-format), so the two halves of the pool live under one image root.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from comic.data.labels import LabelSet
from comic.data.reader import BenchmarkError
from comic.data.sources import BuildParams, LabelSource, Source


def fold_rows(num_images: int, folds: int, seed: int) -> list[list[int]]:
    """Pool rows of each of `folds` test folds (sorted): a permutation seeded by `seed` cut into nearly equal parts.
    The parts are disjoint and cover range(num_images)."""
    if not 2 <= folds <= num_images:
        raise BenchmarkError(f"folds {folds} (--folds / data.folds): need 2 <= folds <= {num_images}, the images "
                             "of the pool")
    order = np.random.default_rng([seed, 2]).permutation(num_images)
    return [sorted(int(r) for r in part) for part in np.array_split(order, folds)]


def fold_sets(source: Source, params: BuildParams) -> tuple[Source, LabelSet, LabelSet]:
    """(the folded source, fold `params.fold`'s training pool under the pool's rule, its test set under the test
    set's rule). Both label sets' file names are relative to the folded source's one image root."""
    root = Path(os.path.commonpath([source.pool.image_root, source.test.image_root]))
    train_rule = _union(source, source.pool.reader, root)
    test_rule = _union(source, source.test.reader, root)
    if train_rule.file_names != test_rule.file_names:
        raise BenchmarkError(f"{source.pool.path} / {source.test.path}: the pool's and the test set's labelling "
                             "rules list different images; folds need both rules over the same images")
    parts = fold_rows(train_rule.num_images, params.folds, params.split_seed)
    test_rows = set(parts[params.fold])
    rest = [r for r in range(train_rule.num_images) if r not in test_rows]
    folded = Source(source.kind, replace(source.pool, image_root=root), replace(source.test, image_root=root))
    return folded, train_rule.subset(rest), test_rule.subset(sorted(test_rows))


def _union(source: Source, reader: str, root: Path) -> LabelSet:
    """The pool's and then the test set's images (each image once, by file) with labels of `reader`'s rule."""
    sets = []
    for split in (source.pool, source.test):
        labels = LabelSource(reader, split.path, split.image_root, split.image_set).read()
        prefix = split.image_root.relative_to(root)
        sets.append((labels, [str(prefix / name) if prefix.parts else name for name in labels.file_names]))
    (pool, pool_files), (test, test_files) = sets
    if pool.class_names != test.class_names:
        raise BenchmarkError(f"{source.test.path}: its classes differ from those of {source.pool.path}")
    seen = set(pool_files)
    extra = [i for i, name in enumerate(test_files) if name not in seen]
    ids = list(pool.image_ids) + [test.image_ids[i] for i in extra]
    files = pool_files + [test_files[i] for i in extra]
    if len(set(ids)) != len(ids):  # two files under one id (e.g. two COCO JSONs numbered alike): name by file
        ids = list(files)
    labels = np.concatenate([pool.labels, test.labels[extra]]) if extra else pool.labels
    return LabelSet(ids, files, list(pool.class_names), labels, pool.category_ids,
                    f"{pool.source} + {test.source}")
