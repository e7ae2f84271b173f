"""Decoded-image cache, the Dataset of `(image, observed, full)` items, transforms and the three DataLoaders.

Decoding JPEGs dominates the cost of small-model training, so each image is decoded and resized once into a
memory-mapped Arrow IPC file of uint8 pixels per split:
    train: shorter side R (aspect kept), RandomResizedCrop(S) + flip happen per item;
    val / test: Resize(R) + CenterCrop(S) done in the cache, only normalisation per item.
S, R, the interpolation and the normalisation are the trunk's (`Preprocess`): torchvision's ImageNet recipe
(R = round(256/224 * S), bilinear, ImageNet mean / std) unless the trunk says otherwise (a timm trunk's data config).
The cache lives in `<benchmark>/cache/` (or `<data.cache_dir>/image-cache/<benchmark>/` when the benchmark folder
is read-only), is named by split, S (R and interpolation when not torchvision's) and format version, and is written
to a temporary file then renamed.
`cache=False` runs the very same preprocessing on the JPEG file for every item (for the benchmark comparison).

Randomness: the train sampler draws the order and one seed per item from (loader seed, epoch) only, and each
item's augmentation runs under its own seed, so batches are identical for any number of workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from comic._io import atomic_write_text, file_lock
from comic.config import DataConfig, ModelConfig
from comic.data.reader import Benchmark, BenchmarkError, Split
from comic.data.sampler import ClassAwareSampler
from comic.models.backbone import timm_data_config
from comic.progress import progress

log = logging.getLogger(__name__)

CACHE_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BATCH_ROWS = 256  # images per Arrow record batch: bounds the memory used while writing the cache


# ---------------------------------------------------------------------------------------- preprocessing ----

INTERPOLATIONS = {"bilinear": (Image.BILINEAR, v2.InterpolationMode.BILINEAR),
                  "bicubic": (Image.BICUBIC, v2.InterpolationMode.BICUBIC)}


def resize_side(size: int) -> int:
    """Shorter side before cropping: 256 for a 224 crop, scaled with the crop size."""
    return round(256 / 224 * size)


@dataclass(frozen=True)
class Preprocess:
    """How a trunk wants its pixels: crop side `size` (S), shorter side `resize` (R) before cropping, the resampling
    filter, and the normalisation. Default: torchvision's ImageNet recipe at S."""

    size: int
    resize: int = 0  # 0: resize_side(size)
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.resize == 0:
            object.__setattr__(self, "resize", resize_side(self.size))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r}: one of {', '.join(INTERPOLATIONS)}")

    @property
    def is_torchvision(self) -> bool:
        """torchvision's ImageNet recipe (the caches of such runs keep the names they always had)."""
        return self == Preprocess(self.size)

    def describe(self) -> dict[str, object]:
        """The recipe as plain values (a cache key's part, a run's record)."""
        return {"size": self.size, "resize": self.resize, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}


def trunk_preprocess(cfg: ModelConfig, size: int) -> Preprocess:
    """The pixels the trunk `cfg.backbone` expects at crop side `size` (data.image_size): for a timm trunk its
    pretrained data config (resize = floor(size / crop_pct), as timm's eval transform; interpolation; mean; std),
    otherwise torchvision's ImageNet recipe."""
    data = timm_data_config(cfg.backbone)
    if data is None:
        return Preprocess(size)
    if data.input_size[-1] != size:
        log.warning("%s was trained at %d px; data.image_size=%d", cfg.backbone, data.input_size[-1], size)
    interpolation = data.interpolation if data.interpolation in INTERPOLATIONS else "bilinear"
    return Preprocess(size, math.floor(size / data.crop_pct), interpolation, tuple(data.mean), tuple(data.std))


def decode(path: Path | BinaryIO, shorter: int, interpolation: str = "bilinear") -> np.ndarray:
    """Decode an image (a file, or a stream of its encoded bytes) and resize its shorter side to `shorter` (bilinear
    or bicubic, antialiased). Returns [H, W, 3] uint8.

    Raises BenchmarkError naming the file when it is missing or cannot be decoded.
    """
    name = path if isinstance(path, str | Path) else "image bytes"
    try:
        with Image.open(path) as image:
            w, h = image.size
            scale = shorter / min(w, h)
            new = (max(1, round(w * scale)), max(1, round(h * scale)))
            # JPEG DCT-domain downscaling to no less than the target: much cheaper than decoding full size.
            image.draft("RGB", new)
            rgb = image.convert("RGB").resize(new, INTERPOLATIONS[interpolation][0])
    except FileNotFoundError as err:
        raise BenchmarkError(f"{name}: missing image file") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BenchmarkError(f"{name}: corrupt image ({err})") from err
    return np.asarray(rgb, dtype=np.uint8)


def load_train_pixels(path: Path, prep: Preprocess) -> np.ndarray:
    """[H, W, 3] uint8 with shorter side `prep.resize`: what the train cache stores."""
    return decode(path, prep.resize, prep.interpolation)


def load_eval_pixels(path: Path | BinaryIO, prep: Preprocess) -> np.ndarray:
    """[S, S, 3] uint8: Resize(R) + CenterCrop(S), what the val/test cache stores."""
    pixels = decode(path, prep.resize, prep.interpolation)
    size = prep.size
    h, w = pixels.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.ascontiguousarray(pixels[top:top + size, left:left + size])


def train_transform(prep: Preprocess, scale_min: float = 0.08) -> v2.Compose:
    """uint8 [3, H, W] -> augmented float32 [3, S, S] (RandomResizedCrop + flip + the trunk's normalisation).

    `scale_min` is the smallest crop area fraction (torchvision's 0.08 by default, the paper's recipe).
    """
    crop = v2.RandomResizedCrop(prep.size, scale=(scale_min, 1.0), antialias=True,
                                interpolation=INTERPOLATIONS[prep.interpolation][1])
    return v2.Compose([crop, v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(prep.mean, prep.std)])


def eval_transform(prep: Preprocess) -> v2.Compose:
    """uint8 [3, S, S] (already resized and cropped) -> float32 [3, S, S] with the trunk's normalisation."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)])


# ------------------------------------------------------------------------------------------------- cache ----

class PixelCache:
    """Read side of one split's cache file: item i -> [H, W, 3] uint8 view into the memory map.

    The file is opened lazily and re-opened after a fork, so the object pickles cheaply into DataLoader workers.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pid: int | None = None
        meta = _read_meta(path)
        self.rows: list[int] = meta["rows"]  # split rows present in the cache (all but skipped images)
        self.skipped: list[dict] = meta["skipped"]

    def __getstate__(self) -> dict:
        return {"path": self.path, "_pid": None, "rows": self.rows, "skipped": self.skipped}

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self) -> None:
        reader = pa.ipc.open_file(pa.memory_map(str(self.path), "r"))
        self._chunks, starts = [], [0]
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            pixels = batch.column("pixels")
            _, offsets, values = pixels.buffers()
            offsets = np.frombuffer(offsets, dtype=np.int32)[pixels.offset:pixels.offset + len(pixels) + 1]
            data = np.frombuffer(values, dtype=np.uint8) if values is not None else np.zeros(0, np.uint8)
            shapes = np.stack([batch.column("height").to_numpy(), batch.column("width").to_numpy()], axis=1)
            self._chunks.append((offsets, data, shapes))
            starts.append(starts[-1] + batch.num_rows)
        self._starts = np.asarray(starts)
        self._pid = os.getpid()

    def check(self) -> None:
        """Open the file and compare its item count with the meta file's; BenchmarkError naming it when damaged."""
        try:
            self._open()
        except (OSError, ValueError, pa.ArrowException) as err:  # truncated: no footer, or batches cut off
            raise BenchmarkError(f"{self.path}: damaged image cache ({err})") from err
        if int(self._starts[-1]) != len(self.rows):
            raise BenchmarkError(f"{self.path}: damaged image cache ({int(self._starts[-1])} images, its meta file "
                                 f"says {len(self.rows)})")

    def get(self, i: int) -> np.ndarray:
        """Pixels of the i-th cached image, [H, W, 3] uint8 (read-only)."""
        if self._pid != os.getpid():
            self._open()
        c = int(np.searchsorted(self._starts, i, side="right")) - 1
        offsets, data, shapes = self._chunks[c]
        j = i - int(self._starts[c])
        h, w = (int(v) for v in shapes[j])
        return data[offsets[j]:offsets[j + 1]].reshape(h, w, 3)


def cache_folder(bench: Benchmark, data: DataConfig) -> Path:
    """Inside the benchmark folder when writable, else under data.cache_dir."""
    if os.access(bench.root, os.W_OK):
        return bench.root / "cache"
    return Path(data.cache_dir).expanduser().resolve() / "image-cache" / bench.root.name


def cache_name(split_name: str, prep: Preprocess) -> str:
    """`<split>-<S>px[-<R>r-<interpolation>]-v<version>.arrow`: torchvision's recipe keeps its historical name."""
    recipe = "" if prep.resize == resize_side(prep.size) and prep.interpolation == "bilinear" else \
        f"-{prep.resize}r-{prep.interpolation}"
    return f"{split_name}-{prep.size}px{recipe}-v{CACHE_VERSION}.arrow"


def ensure_cache(bench: Benchmark, split_name: str, prep: Preprocess, folder: Path,
                 skip_bad: bool = False) -> PixelCache:
    """Build the cache of one split with the pixels `prep` asks for unless present (no work then); returns its
    reader. The normalisation happens per item, so it is not part of the cache."""
    path = folder / cache_name(split_name, prep)
    cache = _open_cache(path)
    if cache is not None:
        return cache
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / f"{path.name}.lock"):
        if _open_cache(path) is None:  # another process may have built it while we waited
            _write_cache(path, bench, split_name, prep, skip_bad)
    return PixelCache(path)


def _open_cache(path: Path) -> PixelCache | None:
    """The cache at `path` if it is there and whole; a damaged one is deleted (with a warning naming it)."""
    if not path.is_file():
        return None
    try:
        cache = PixelCache(path)
        cache.check()
        return cache
    except (BenchmarkError, OSError, ValueError, KeyError) as err:  # the meta file too: missing or not JSON
        log.warning("rebuilding the damaged image cache %s: %s", path, err)
        for damaged in (path, _meta_path(path)):
            damaged.unlink(missing_ok=True)
        return None


def _write_cache(path: Path, bench: Benchmark, split_name: str, prep: Preprocess, skip_bad: bool) -> None:
    split = bench.split(split_name)
    load = load_train_pixels if split_name == "train" else load_eval_pixels
    schema = pa.schema([("pixels", pa.binary()), ("height", pa.int32()), ("width", pa.int32())])
    rows, skipped = [], []
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for start in progress(range(0, len(split), _BATCH_ROWS), desc=f"caching {split_name} images",
                                  unit="batch", leave=False):
                idx = list(range(start, min(start + _BATCH_ROWS, len(split))))
                decoded = _decode_many([split.paths[i] for i in idx], load, prep, skip_bad)
                good = [(i, px) for i, (px, problem) in zip(idx, decoded, strict=True) if px is not None]
                skipped += [{"split": split_name, "file": str(split.paths[i]), "reason": problem}
                            for i, (px, problem) in zip(idx, decoded, strict=True) if px is None]
                rows += [i for i, _ in good]
                writer.write_batch(_record_batch(schema, [px for _, px in good]))
        _write_meta(tmp, rows, skipped, bench, prep.size)
        os.replace(_meta_path(tmp), _meta_path(path))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, _meta_path(tmp)):
            leftover.unlink(missing_ok=True)
    if skipped:
        log.warning("%s: skipped %d unreadable %s images (see %s)", bench.root, len(skipped), split_name,
                    _meta_path(path))
    log.info("cached %d %s images at %dpx in %s", len(rows), split_name, prep.size, path)


def _decode_many(paths: list[Path], load, prep: Preprocess, skip_bad: bool) -> list[tuple[np.ndarray | None, str]]:
    """Decode in threads (PIL releases the GIL while decoding); with skip_bad, failures come back as (None, why)."""
    def one(path: Path) -> tuple[np.ndarray | None, str]:
        try:
            return load(path, prep), ""
        except BenchmarkError as err:
            if not skip_bad:
                raise
            return None, str(err)

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, paths))


def _record_batch(schema, images: list[np.ndarray]):
    return pa.record_batch([pa.array([im.tobytes() for im in images], pa.binary()),
                            pa.array([im.shape[0] for im in images], pa.int32()),
                            pa.array([im.shape[1] for im in images], pa.int32())], schema=schema)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_meta(path: Path, rows: list[int], skipped: list[dict], bench: Benchmark, size: int) -> None:
    meta = {"version": CACHE_VERSION, "benchmark": bench.card.get("hash", ""), "size": size, "rows": rows,
            "skipped": skipped, "skipped_count": len(skipped)}
    atomic_write_text(_meta_path(path), json.dumps(meta))


def _read_meta(path: Path) -> dict:
    return json.loads(_meta_path(path).read_text())


# ----------------------------------------------------------------------------------------- dataset, loader ----

class ImageDataset(Dataset):
    """Items `(image float32 [3, S, S], observed float32 [C], full float32 [C])` of one split.

    Train items are addressed by `(index, seed)` pairs from `SeededSampler`; the seed drives that item's
    augmentation. Eval items are addressed by index. With a cache, only the split rows present in it are used.
    """

    def __init__(self, split: Split, prep: Preprocess, train: bool, cache: PixelCache | None = None,
                 crop_scale_min: float = 0.08) -> None:
        self.split, self.prep, self.train, self.cache = split, prep, train, cache
        self.rows = list(range(len(split))) if cache is None else cache.rows
        self.transform = train_transform(prep, crop_scale_min) if train else eval_transform(prep)
        self.observed = torch.from_numpy(split.observed.astype(np.float32))
        self.full = torch.from_numpy(split.full.astype(np.float32))

    def __len__(self) -> int:
        return len(self.rows)

    def pixels(self, index: int) -> np.ndarray:
        """[H, W, 3] uint8 of item `index` (from the cache or decoded now)."""
        if self.cache is not None:
            return self.cache.get(index)
        path = self.split.paths[self.rows[index]]
        return load_train_pixels(path, self.prep) if self.train else load_eval_pixels(path, self.prep)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = torch.from_numpy(np.array(self.pixels(index))).permute(2, 0, 1)  # copy: the memory map is read-only
        if seed is None:
            image = self.transform(image)
        else:
            image = _seeded(self.transform, image, seed)
        row = self.rows[index]
        return image, self.observed[row], self.full[row]


def _seeded(transform: v2.Compose, image: torch.Tensor, seed: int) -> torch.Tensor:
    """Run a torchvision transform (which draws from the global CPU RNG) under `seed`, leaving that RNG as it was."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators of the trainer stay untouched
    try:
        return transform(image)
    finally:
        torch.set_rng_state(state)


class SeededSampler(Sampler):
    """Shuffled `(index, item_seed)` pairs, a pure function of (generator seed, pass number).

    `generator` is the DataLoader's generator; only its *seed* is read (`initial_seed()`), never its stream, which
    the DataLoader also draws from (worker base seeds) differently with and without persistent workers. The pass
    number counts iterations since that seed was set, so reseeding the generator before each epoch (engine.fit)
    or calling `set_epoch(e)` (like DistributedSampler) pins an epoch's batches, for example on resume.
    """

    def __init__(self, length: int, generator: torch.Generator) -> None:
        self.length, self.generator = length, generator
        self._seed, self._pass = generator.initial_seed(), 0

    def set_epoch(self, epoch: int) -> None:
        self._seed, self._pass = self.generator.initial_seed(), epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.generator.initial_seed() != self._seed:  # reseeded from outside: a new stream starts
            self._seed, self._pass = self.generator.initial_seed(), 0
        state = np.random.SeedSequence([self._seed, self._pass]).generate_state(1, np.uint64)[0]
        self._pass += 1
        stream = torch.Generator().manual_seed(int(state >> np.uint64(1)))
        order = torch.randperm(self.length, generator=stream).tolist()
        seeds = torch.randint(0, 2**62, (self.length,), generator=stream).tolist()
        return iter(list(zip(order, seeds, strict=True)))


def build_datasets(bench: Benchmark, data: DataConfig, cache: bool = True,
                   prep: Preprocess | None = None) -> dict[str, ImageDataset]:
    """The train / val / test datasets with the trunk's preprocessing `prep` (default: torchvision's at
    data.image_size; `trunk_preprocess` gives a config's); caches built on first use."""
    prep = prep or Preprocess(data.image_size)
    folder = cache_folder(bench, data) if cache else None
    out = {}
    for name in ("train", "val", "test"):
        split_cache = ensure_cache(bench, name, prep, folder, data.skip_bad_images) if cache else None
        out[name] = ImageDataset(bench.split(name), prep, name == "train", split_cache, data.crop_scale_min)
    return out


def build_loaders(bench: Benchmark, data: DataConfig, batch_size: int, seed: int, pin_memory: bool = False,
                  cache: bool = True, prep: Preprocess | None = None) -> dict[str, DataLoader]:
    """DataLoaders 'train' (shuffled by `seed`, last partial batch dropped), 'val' and 'test' (in order).

    Batches are `(images [B, 3, S, S] float32, observed [B, C] float32, full [B, C] float32)`, identical for any
    data.num_workers given `seed`. Epoch e's order and augmentation are fixed by reseeding `loader.generator`
    before it, or by `loader.sampler.set_epoch(e)`; otherwise successive passes differ, deterministically.
    """
    datasets = build_datasets(bench, data, cache, prep)
    common = {"num_workers": data.num_workers, "pin_memory": pin_memory}
    train = datasets["train"]
    generator = torch.Generator().manual_seed(seed)
    # Train workers persist across epochs (no restart cost on the hot path); eval loaders run once per epoch.
    loaders = {"train": DataLoader(train, batch_size=batch_size, sampler=SeededSampler(len(train), generator),
                                   drop_last=True, generator=generator, persistent_workers=data.num_workers > 0,
                                   **common)}
    for name in ("val", "test"):  # own generators: an evaluation pass never draws from the global RNG training uses
        loaders[name] = DataLoader(datasets[name], batch_size=batch_size, shuffle=False, drop_last=False,
                                   generator=torch.Generator(), **common)
    if len(train) < batch_size:
        log.warning("train split has %d images, fewer than one batch of %d: the train loader is empty",
                    len(train), batch_size)
    return loaders


def class_aware_loader(train: DataLoader, seed: int) -> DataLoader:
    """A training loader over the same dataset with multi-label class-aware sampling (DB, LWS stage 2).

    Draws `len(dataset)` images per epoch: a class uniformly, then one of its (observed) images uniformly. Its
    generator is reseeded by the trainer each epoch like the random loader's, so epochs are reproducible.
    """
    dataset = train.dataset
    labels = dataset.observed[torch.as_tensor(dataset.rows)]
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=train.batch_size, sampler=ClassAwareSampler(labels, generator=generator),
                      drop_last=True, generator=generator, num_workers=train.num_workers, pin_memory=train.pin_memory,
                      persistent_workers=train.num_workers > 0, collate_fn=train.collate_fn)
