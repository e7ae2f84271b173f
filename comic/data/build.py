"""The PLT benchmark builder: source labels -> train / val / test splits -> a content-addressed benchmark folder.

A build reads the full labels of a source train pool and a source test set, selects the training images (Pareto
long-tail subsample, or all of them; `comic.data.longtail`), drops positives of the training images (the missing-label
protocol, `comic.data.partial`), draws a validation split from pool images *not* selected for training (full labels,
observed = full) and keeps the source test set whole (full labels).

Output: `<out>/<kind>-<hash>/` where the hash covers the builder parameters and a checksum of the source annotation
files; `comic.data.card` says what it holds. A build is written into a hidden temporary sibling and renamed at the
end: a folder with the final name is always complete, and rebuilding with the same inputs finds it and does no work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from comic._io import absolute_path, file_digest, make_temp_dir, publish_dir, remove_stale_temps, stable_hash
from comic.config import Config, ConfigError, DataConfig, apply_overrides, to_flat_dict
from comic.data.card import BUILDER_VERSION, BuildContent, make_card, write_benchmark
from comic.data.folds import fold_sets
from comic.data.labels import LabelSet
from comic.data.longtail import pareto_subsample
from comic.data.partial import drop_positives
from comic.data.reader import CARD_JSON, BenchmarkError, content_digest
from comic.data.sources import BuildParams, LabelSource, Source, source_from_config
from comic.progress import progress

log = logging.getLogger(__name__)


def ensure_benchmark(data: DataConfig) -> Path:
    """Build (or find, doing no work) the benchmark `data` describes; returns its absolute directory.

    `data.root` naming a built benchmark directory (it holds card.json) is returned as is. Otherwise the source
    is read from `data.root` (synthetic: generated under `data.cache_dir`) and the benchmark is built under
    `data.cache_dir`.
    """
    if data.root and (Path(data.root) / CARD_JSON).is_file():
        return absolute_path(data.root)
    return build_benchmark(source_from_config(data), BuildParams.from_config(data), data.cache_dir)


# The data.* keys a built benchmark fixed when it was built (its card's parameters).
BUILT_KEYS = ("longtail", "max_count", "min_count", "pareto_b", "missing_rate", "split_seed", "val_size",
              "skip_bad_images", "folds", "fold")


def adopt_built(cfg: Config, explicit: Iterable[str] = ()) -> Config:
    """`cfg` with the data.* values of the built benchmark `data.root` names (its card), so that what a run records
    is what it trains on. An `explicit` override that disagrees with the card raises: it cannot apply to a built
    benchmark and would otherwise be ignored in silence."""
    card_path = Path(cfg.data.root) / CARD_JSON if cfg.data.root else None
    if card_path is None or not card_path.is_file():
        return cfg
    card = json.loads(card_path.read_text())
    built = {f"data.{k}": card["parameters"][k] for k in BUILT_KEYS if k in card["parameters"]}
    built["data.benchmark"] = card["benchmark"]
    flat = to_flat_dict(cfg)
    clash = [f"{k}={flat[k]!r} (built with {v!r})" for k, v in built.items()
             if k in set(explicit) and apply_overrides(cfg, {k: v}) != cfg]
    if clash:
        raise ConfigError(f"{cfg.data.root} is a built benchmark; {', '.join(clash)} would change it: drop the "
                          "override, or point --data / data.root at the source folder to build the benchmark you "
                          "want")
    return apply_overrides(cfg, built)


def benchmark_digest(data: DataConfig) -> str:
    """The content digest of the benchmark `data` describes (built or found first; see `comic.data.reader`)."""
    return content_digest(json.loads((ensure_benchmark(data) / CARD_JSON).read_text()))


def build_benchmark(source: Source, params: BuildParams, out: str | Path) -> Path:
    """Build the benchmark of `source` with `params` under `out` unless it exists; returns its directory."""
    params.check()
    out = absolute_path(out)
    key = benchmark_key(source, params)
    final = out / f"{source.kind}-{key[:12]}"
    if (final / CARD_JSON).is_file():
        log.info("benchmark %s already built; reusing it (no work)", final)
        return final
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, final.name)
    content = _assemble(source, params)
    parts = _key_parts(source, params)  # cheap now: file digests are remembered
    content.card.update(name=final.name, hash=key, source_sha256={k: parts[k]["sha256"] for k in ("pool", "test")})
    tmp = make_temp_dir(out, final.name)
    try:
        write_benchmark(tmp, content)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if publish_dir(tmp, final, CARD_JSON):
        log.info("benchmark built: %s", final)
    return final


def benchmark_key(source: Source, params: BuildParams) -> str:
    """sha256 over the builder version, kind, parameters, source locations and source annotation checksums."""
    return stable_hash(_key_parts(source, params), length=64)


def _key_parts(source: Source, params: BuildParams) -> dict[str, Any]:
    parts: dict[str, Any] = {"builder": BUILDER_VERSION, "kind": source.kind, "params": params.hashed()}
    for name, split_source in (("pool", source.pool), ("test", source.test)):
        parts[name] = {**split_source.describe(), "sha256": checksum(split_source.annotation_files())}
    if params.rng_after_voc:
        parts["rng_after_voc"] = checksum(_voc_prefix_source(params.rng_after_voc).annotation_files())
    return parts


def checksum(files: Sequence[Path]) -> str:
    """sha256 over the names and contents of `files`; a missing file is an error naming it."""
    digest = hashlib.sha256()
    for path in files:
        if not path.is_file():
            raise BenchmarkError(f"{path}: source annotation file not found")
        digest.update(path.name.encode() + b"\0" + _file_digest(path).encode())
    return digest.hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so repeated ensure_benchmark calls in one process
    (a trainer checks its benchmark more than once) hash COCO's 450 MB train JSON only once."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


def _assemble(source: Source, params: BuildParams) -> BuildContent:
    log.info("reading labels: pool %s, test %s", source.pool.path, source.test.path)
    if params.folds:
        source, pool, test = fold_sets(source, params)
        log.info("fold %d of %d: %d test images, %d in the training pool", params.fold, params.folds,
                 test.num_images, pool.num_images)
    else:
        pool, test = source.pool.read(), source.test.read()
    _check_sources(source, pool, test)
    skipped: list[dict] = []
    train_rows, val_rows = _select_train_val(pool, source.pool.image_root, params, skipped)
    test_rows = _check_rows(test, source.test.image_root, list(range(test.num_images)), "test", params, skipped)
    if not train_rows:
        raise BenchmarkError(f"{source.pool.path}: the training selection is empty (no usable images)")
    observed = drop_positives(pool.labels[train_rows], params.missing_rate, params.split_seed)
    content = BuildContent(pool, test, {"train": train_rows, "val": val_rows, "test": test_rows}, observed)
    content.card = make_card(source, params, content, skipped)
    return content


def _check_sources(source: Source, pool: LabelSet, test: LabelSet) -> None:
    for split_source, labels in ((source.pool, pool), (source.test, test)):
        if labels.num_images == 0 or labels.num_classes == 0:
            raise BenchmarkError(f"{split_source.path}: empty source ({labels.num_images} images, "
                                 f"{labels.num_classes} classes)")
    if not pool.labels.any():
        raise BenchmarkError(f"{source.pool.path}: empty source: no image has a positive label")
    if pool.class_names != test.class_names:
        raise BenchmarkError(f"{source.test.path}: its classes differ from those of {source.pool.path} "
                             f"({len(test.class_names)} vs {len(pool.class_names)} classes, or another order)")


def _select_train_val(pool: LabelSet, image_root: Path, params: BuildParams,
                      skipped: list[dict]) -> tuple[list[int], list[int]]:
    """Train and val rows of the pool (sorted), images checked."""
    if params.longtail == "pareto":
        train_rows = _check_rows(pool, image_root, _select_train(pool, params), "train", params, skipped)
        return train_rows, _select_val(pool, image_root, train_rows, params, skipped)
    # longtail none: everything trains except the validation images, which are drawn first.
    if params.val_size > pool.num_images / 2:
        log.warning("validation size %d (--val-size / data.val_size) takes %d of the %d pool images: only %d are "
                    "left to train on; lower it", params.val_size, params.val_size, pool.num_images,
                    pool.num_images - params.val_size)
    val_rows = _select_val(pool, image_root, [], params, skipped)
    bad = {record["file"] for record in skipped}
    rest = [r for r in sorted(set(range(pool.num_images)) - set(val_rows))
            if str(image_root / pool.file_names[r]) not in bad]
    return _check_rows(pool, image_root, rest, "train", params, skipped), val_rows


def _select_train(pool: LabelSet, params: BuildParams) -> list[int]:
    """Pool rows of the Pareto long-tail subsample, in source order."""
    rng = random.Random(params.split_seed)
    if params.rng_after_voc:
        voc = _voc_prefix_source(params.rng_after_voc).read()
        log.info("advancing the Pareto RNG with a VOC build (max %d, b %g) first", params.voc_max_count,
                 params.voc_pareto_b)
        pareto_subsample(voc.labels, params.voc_max_count, params.voc_pareto_b, rng=rng)
    rows = pareto_subsample(pool.labels, params.max_count, params.pareto_b, min_count=params.min_count, rng=rng)
    return sorted(rows)


def _voc_prefix_source(path: str) -> LabelSource:
    p = absolute_path(path)
    return LabelSource("voc-train" if p.is_dir() else "csv", p, p, "trainval")


def _select_val(pool: LabelSet, image_root: Path, train_rows: list[int], params: BuildParams,
                skipped: list[dict]) -> list[int]:
    """`val_size` random pool rows not used for training (bad images replaced by the next candidates)."""
    taken = set(train_rows)
    left = [r for r in range(pool.num_images) if r not in taken]
    if params.val_size > len(left):
        raise BenchmarkError(
            f"validation size {params.val_size} (--val-size / data.val_size) is larger than the {len(left)} pool "
            f"images available for it ({pool.num_images} in the pool of {pool.source}, {len(train_rows)} selected "
            "for training)")
    order = np.random.default_rng([params.split_seed, 1]).permutation(len(left))
    candidates = [left[i] for i in order]
    chosen: list[int] = []
    while len(chosen) < params.val_size and candidates:
        batch, candidates = candidates[:params.val_size - len(chosen)], candidates[params.val_size - len(chosen):]
        chosen += _check_rows(pool, image_root, batch, "val", params, skipped)
    if len(chosen) < params.val_size:
        raise BenchmarkError(f"validation size {params.val_size} (--val-size / data.val_size): only {len(chosen)} "
                             "readable pool images are left for validation")
    return sorted(chosen)


def _check_rows(labels: LabelSet, image_root: Path, rows: list[int], split: str, params: BuildParams,
                skipped: list[dict]) -> list[int]:
    """Decode-check the images of `rows`; bad ones raise, or with skip_bad_images are dropped and recorded."""
    paths = [image_root / labels.file_names[r] for r in rows]
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        problems = list(progress(pool.map(image_problem, paths), total=len(paths), desc=f"checking {split} images",
                                 unit="img", leave=False))
    good = []
    for row, path, problem in zip(rows, paths, problems, strict=True):
        if problem is None:
            good.append(row)
        elif params.skip_bad_images:
            log.warning("skipping %s image %s: %s", split, path, problem)
            skipped.append({"split": split, "file": str(path), "reason": problem})
        else:
            raise BenchmarkError(f"{path}: {problem} ({split} image {labels.image_ids[row]!r} of {labels.source}); "
                                 "fix the file or pass --skip-bad-images / data.skip_bad_images=true to skip "
                                 "(and count) such images")
    return good


def image_problem(path: Path) -> str | None:
    """None if `path` decodes as an image, else why not ('missing image file', 'corrupt image: ...')."""
    try:
        with Image.open(path) as image:
            # Decoding at a reduced DCT scale still reads all of the data (truncation is caught) at a fraction of
            # the cost of a full decode.
            image.draft("RGB", (64, 64))
            image.load()
    except FileNotFoundError:
        return "missing image file"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"corrupt image ({err})"
    return None


