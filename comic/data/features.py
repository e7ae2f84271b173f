"""The trunk-feature cache of profile `frozen`: a frozen trunk applied once per image view, then only read.

With a frozen trunk in eval mode (ImageNet BatchNorm statistics) its output depends on the image view alone, so it is
computed once per benchmark and recipe and every trial of a sweep or ablation trains only the heads on it:
    train.npy  [K, N_train, D]  K augmented views per training image (RandomResizedCrop + flip, as the image path),
                                each view seeded by (view, image); an epoch draws one view per image, seeded
    val.npy    [N_val, D]       the evaluation crop (resize + center crop)
    test.npy   [N_test, D]
    meta.json                   the key's parts, shapes, the split rows present, extraction time
float16, memory-mapped .npy files in `<data.cache_dir>/features/<backbone>-<key>/`, the key a hash of the images of
each split (and the source annotations' checksums), the backbone, weights, the trunk's preprocessing (image size;
resize, interpolation and normalisation when not torchvision's ImageNet recipe), crop recipe and K: benchmarks
that differ only in their labels (another missing rate) share one cache. The first process that needs a cache
builds it under a file lock (a sweep or ablation driver does so before its trials), into a temporary folder renamed
at the end; a missing or damaged file is rebuilt with a warning that names it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from comic._io import UserError, absolute_path, file_lock, make_temp_dir, publish_dir, stable_hash
from comic.config import Config
from comic.data.build import ensure_benchmark
from comic.data.images import ImageDataset, Preprocess, SeededSampler, build_datasets, trunk_preprocess
from comic.data.reader import Benchmark, Split, load_benchmark
from comic.device import Runtime, runtime
from comic.models.backbone import build_trunk, weights_id
from comic.progress import progress

log = logging.getLogger(__name__)

FEATURES_VERSION = 1
META = "meta.json"
SPLITS = ("train", "val", "test")
EXTRACT_BATCH = 64
EVAL_BATCH = 1024
_VIEW_STRIDE = 1_000_000_007  # item seed of view v of image i: v * stride + i (distinct for < 1e9 images)


class DamagedCache(UserError):
    """A feature cache file is missing, truncated or inconsistent with its meta.json; names the file."""


@dataclass(frozen=True)
class FeatureRecipe:
    """Everything besides the benchmark that decides the cached features (part of the cache key)."""

    backbone: str
    weights: str  # `weights_id`: 'none', torchvision's ImageNet file name, or a file's hash
    image_size: int
    crop_scale_min: float  # train views: RandomResizedCrop(image_size, scale=(crop_scale_min, 1)) + flip
    views: int  # K
    preprocess: tuple[tuple[str, Any], ...] = ()  # the trunk's pixels when not torchvision's recipe at image_size

    @classmethod
    def of(cls, cfg: Config) -> FeatureRecipe:
        prep = trunk_preprocess(cfg.model, cfg.data.image_size)
        described = () if prep.is_torchvision else tuple((k, v) for k, v in prep.describe().items() if k != "size")
        return cls(cfg.model.backbone, weights_id(cfg.model), cfg.data.image_size, cfg.data.crop_scale_min,
                   cfg.data.feature_views, described)

    def pixels(self) -> Preprocess:
        """The preprocessing the cached features were computed with."""
        return Preprocess(self.image_size, **{k: tuple(v) if isinstance(v, list) else v for k, v in self.preprocess})

    def describe(self) -> dict[str, Any]:
        """The recipe as plain values; a torchvision recipe keeps the key it always had (no 'preprocess' entry)."""
        out = asdict(self)
        if self.preprocess:
            out["preprocess"] = dict(self.preprocess)
        else:
            del out["preprocess"]
        return out


def feature_key(bench: Benchmark, recipe: FeatureRecipe) -> str:
    """The cache's content address: which images each split holds (file names, source checksums), the recipe and
    the format version; not the labels, so another missing rate of the same images finds the same features."""
    images = {name: [p.name for p in bench.split(name).paths] for name in SPLITS}
    sources = bench.card.get("source_sha256", {})
    return stable_hash({"images": images, "sources": sources, "recipe": recipe.describe(),
                        "version": FEATURES_VERSION})


def feature_folder(bench: Benchmark, cfg: Config) -> Path:
    """Where the cache of `cfg`'s recipe on `bench` lives: `<data.cache_dir>/features/<backbone>-<key>`."""
    recipe = FeatureRecipe.of(cfg)
    return absolute_path(cfg.data.cache_dir) / "features" / f"{recipe.backbone}-{feature_key(bench, recipe)}"


class FeatureCache:
    """The read side of one cache folder: memory-mapped float16 arrays, checked against meta.json on opening."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta = _read(folder / META, lambda path: json.loads(path.read_text()))
        self.arrays = {name: _read(folder / f"{name}.npy", lambda path: np.load(path, mmap_mode="r"))
                       for name in SPLITS}
        for name, array in self.arrays.items():
            expected = self.meta.get("shapes", {}).get(name)
            if list(array.shape) != expected or array.dtype != np.float16:
                raise DamagedCache(f"{folder / f'{name}.npy'}: shape {array.shape} {array.dtype}, meta.json says "
                                   f"{expected} float16")

    @property
    def width(self) -> int:
        """D, the trunk's output width."""
        return int(self.meta["shapes"]["val"][1])

    def rows(self, split: str) -> list[int]:
        """The split rows the cached items stand for (all of them unless images were skipped)."""
        return list(self.meta["rows"][split])


def _read(path: Path, load):
    """`load(path)`, or DamagedCache naming the file when it is absent, truncated or not what it should be."""
    try:
        return load(path)
    except (OSError, ValueError) as err:  # missing, mmap beyond the end of a truncated file, bad header or JSON
        raise DamagedCache(f"{path}: {err}") from err


def ensure_features(bench: Benchmark, cfg: Config, rt: Runtime) -> FeatureCache:
    """The cache of `cfg`'s recipe on `bench`: opened if it is there, else built (under a file lock) and opened."""
    recipe = FeatureRecipe.of(cfg)
    folder = feature_folder(bench, cfg)
    cache = _open(folder)
    if cache is not None:
        return cache
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.with_name(f".{folder.name}.lock")):
        cache = _open(folder)  # another process may have built it while we waited
        if cache is None:
            # The extraction's loaders draw from torch's global RNG; a trial that builds the cache must train
            # exactly as one that reads it.
            with torch.random.fork_rng(devices=[]):
                _build(folder, bench, cfg, recipe, rt)
            cache = FeatureCache(folder)
    return cache


def prepare_features(cfg: Config) -> FeatureCache:
    """The cache of `cfg` built (or found) before any trial starts: a sweep's or an ablation's driver does this, so
    that its trials only read it."""
    return ensure_features(load_benchmark(ensure_benchmark(cfg.data)), cfg, runtime(cfg.engine))


def _open(folder: Path) -> FeatureCache | None:
    if not folder.exists():
        return None
    try:
        return FeatureCache(folder)
    except DamagedCache as err:
        log.warning("feature cache damaged, rebuilding it: %s", err)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _build(folder: Path, bench: Benchmark, cfg: Config, recipe: FeatureRecipe, rt: Runtime) -> None:
    start = time.perf_counter()
    trunk, width = frozen_trunk(cfg, rt)
    datasets = build_datasets(bench, cfg.data, prep=recipe.pixels())  # decoded-image caches (built on first use)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(folder.parent, folder.name)
    try:
        total = recipe.views * len(datasets["train"]) + len(datasets["val"]) + len(datasets["test"])
        with progress(total=total, desc=f"{recipe.backbone} features", unit="img") as bar:
            shapes = {name: _write_split(tmp / f"{name}.npy", trunk, ds, recipe.views if name == "train" else 0,
                                         width, rt, bar) for name, ds in datasets.items()}
        meta = {"version": FEATURES_VERSION, "built_for": bench.root.name, "recipe": recipe.describe(),
                "shapes": shapes, "rows": {name: list(ds.rows) for name, ds in datasets.items()},
                "seconds": round(time.perf_counter() - start, 1), "device": str(rt.device)}
        (tmp / META).write_text(json.dumps(meta))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if publish_dir(tmp, folder, META):
        log.info("cached %s features of %d images (%d train views) in %s, %.0f s", recipe.backbone, total,
                 recipe.views, folder, time.perf_counter() - start)


def frozen_trunk(cfg: Config, rt: Runtime) -> tuple[torch.nn.Module, int]:
    """The trunk in eval mode on the device; a random one ('none') is drawn from a fixed seed, so that the cache
    key 'none' stands for one trunk."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trunk, width = build_trunk(cfg.model)
    trunk = trunk.eval().requires_grad_(False).to(rt.device)
    if rt.channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    return trunk, width


def _write_split(path: Path, trunk: torch.nn.Module, dataset: ImageDataset, views: int, width: int, rt: Runtime,
                 bar: Any) -> list[int]:
    """Trunk features of every item of `dataset` into the .npy at `path`: [views, N, D] for the training split
    (views >= 1), [N, D] for evaluation splits (views 0). Returns the shape."""
    shape = (views, len(dataset), width) if views else (len(dataset), width)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    for view in range(max(views, 1)):
        target = out[view] if views else out
        sampler = _ViewSampler(len(dataset), view) if views else None
        loader = DataLoader(dataset, batch_size=EXTRACT_BATCH, sampler=sampler, shuffle=False, num_workers=0)
        done = 0
        for images, _, _ in loader:
            with torch.inference_mode(), rt.autocast():
                features = trunk(rt.inputs_to_device(images))
            target[done:done + len(features)] = features.float().cpu().numpy()
            done += len(features)
            bar.update(len(features))
    out.flush()
    return list(shape)


class _ViewSampler(Sampler):
    """Items `(i, seed of view v of image i)` in order: every view of every image has its own augmentation."""

    def __init__(self, length: int, view: int) -> None:
        self.length, self.view = length, view

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return iter((i, self.view * _VIEW_STRIDE + i) for i in range(self.length))


# ------------------------------------------------------------------------------------------------ dataset, loader


class FeatureDataset(Dataset):
    """Items `(trunk features float32 [D], observed float32 [C], full float32 [C])` of one split of a cache, read a
    batch at a time (`__getitems__`: one index into the cache instead of B items and a collate).

    Training items are addressed by `(index, seed)` pairs from `SeededSampler`: the seed picks the view (seed % K),
    so the views an epoch draws are fixed by (loader seed, epoch), as the image path's augmentations are.
    """

    def __init__(self, features: np.ndarray, split: Split, rows: list[int], train: bool) -> None:
        self.features, self.rows, self.train = features, np.asarray(rows, dtype=np.int64), train
        self.observed = torch.from_numpy(split.observed.astype(np.float32))
        self.full = torch.from_numpy(split.full.astype(np.float32))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features, observed, full = self.__getitems__([key])
        return features[0], observed[0], full[0]

    def __getitems__(self, keys: list[int | tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch: features [B, D], observed [B, C], full [B, C]."""
        pairs = np.array([key if isinstance(key, tuple) else (key, 0) for key in keys], dtype=np.int64)
        index = pairs[:, 0]
        vectors = self.features[pairs[:, 1] % self.features.shape[0], index] if self.train else self.features[index]
        rows = torch.from_numpy(self.rows[index])
        return torch.from_numpy(np.asarray(vectors, dtype=np.float32)), self.observed[rows], self.full[rows]


def whole_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The DataLoader's collate for datasets that return whole batches (`__getitems__`)."""
    return batch


def build_feature_loaders(bench: Benchmark, cache: FeatureCache, batch_size: int, seed: int) -> dict[str, DataLoader]:
    """DataLoaders 'train' (shuffled, one view per image per epoch, last partial batch dropped), 'val' and 'test' of
    batches `(features [B, D], observed [B, C], full [B, C])`, like `comic.data.images.build_loaders`; evaluation
    batches of EVAL_BATCH (a forward pass only: large GEMMs run near the machine's rate)."""
    datasets = {name: FeatureDataset(cache.arrays[name], bench.split(name), cache.rows(name), name == "train")
                for name in SPLITS}
    generator = torch.Generator().manual_seed(seed)
    train = datasets["train"]
    loaders = {"train": DataLoader(train, batch_size=batch_size, sampler=SeededSampler(len(train), generator),
                                   drop_last=True, generator=generator, num_workers=0, collate_fn=whole_batch)}
    for name in ("val", "test"):  # own generators: an evaluation pass never draws from the global RNG training uses
        loaders[name] = DataLoader(datasets[name], batch_size=max(batch_size, EVAL_BATCH), shuffle=False,
                                   num_workers=0, collate_fn=whole_batch, generator=torch.Generator())
    return loaders
