"""Image cache, Dataset and loaders: shapes, determinism (also with workers), cache == decode, bad images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from comic.config import DataConfig
from comic.data import images, synthetic
from comic.data.build import build_benchmark
from comic.data.reader import Benchmark, BenchmarkError, Split, load_benchmark
from comic.data.sources import BuildParams, coco_root_source

SIZE, BATCH = 32, 8


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("images")
    source = synthetic.generate(work / "source", num_images=40, num_test_images=10, num_classes=5, seed=2,
                                image_size=56)
    params = BuildParams(longtail="none", missing_rate=0.4, val_size=6)
    return build_benchmark(coco_root_source(source), params, work / "out")


@pytest.fixture
def bench(built: Path) -> Benchmark:
    return load_benchmark(built)


def _data(**kw) -> DataConfig:
    return DataConfig(**{"image_size": SIZE, "num_workers": 0, **kw})


def _epoch(loader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_items_and_batches_have_the_contracted_shapes(bench: Benchmark) -> None:
    loaders = images.build_loaders(bench, _data(), BATCH, seed=0)
    image, observed, full = loaders["val"].dataset[0]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert observed.shape == full.shape == (5,) and observed.dtype == full.dtype == torch.float32
    train = _epoch(loaders["train"])
    assert len(train) == len(bench.train) // BATCH  # last partial batch dropped
    for x, obs, fl in train:
        assert x.shape == (BATCH, 3, SIZE, SIZE) and obs.shape == fl.shape == (BATCH, 5)
        assert (obs <= fl).all()
    assert abs(float(torch.cat([b[0] for b in train]).mean())) < 1.5  # normalised, not 0..255
    assert sum(b[0].shape[0] for b in loaders["test"]) == len(bench.test)


def test_train_batches_are_a_function_of_seed_and_epoch(bench: Benchmark) -> None:
    a = images.build_loaders(bench, _data(), BATCH, seed=0)["train"]
    b = images.build_loaders(bench, _data(), BATCH, seed=0)["train"]
    c = images.build_loaders(bench, _data(), BATCH, seed=1)["train"]
    first_a, first_b, first_c = _epoch(a), _epoch(b), _epoch(c)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first_a, first_b, strict=True))
    assert not torch.equal(first_a[0][0], first_c[0][0])
    second_a = _epoch(a)
    assert not torch.equal(first_a[0][0], second_a[0][0])  # a new order and new crops each epoch
    b.sampler.set_epoch(1)
    assert torch.equal(_epoch(b)[0][0], second_a[0][0])  # resume: set_epoch reproduces an epoch


def test_global_rng_is_left_alone(bench: Benchmark) -> None:
    loader = images.build_loaders(bench, _data(), BATCH, seed=0)["train"]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _epoch(loader)
    assert torch.equal(torch.rand(3), expected)


def test_workers_give_the_same_batches(bench: Benchmark) -> None:
    serial = _epoch(images.build_loaders(bench, _data(), BATCH, seed=4)["train"])
    parallel = _epoch(images.build_loaders(bench, _data(num_workers=2), BATCH, seed=4)["train"])
    assert all(torch.equal(x[0], y[0]) for x, y in zip(serial, parallel, strict=True))


def test_cache_and_decoding_give_the_same_tensors(bench: Benchmark) -> None:
    cached = images.build_loaders(bench, _data(), BATCH, seed=0, cache=True)
    decoded = images.build_loaders(bench, _data(), BATCH, seed=0, cache=False)
    for split in ("val", "test", "train"):
        for x, y in zip(_epoch(cached[split]), _epoch(decoded[split]), strict=True):
            assert all(torch.equal(a, b) for a, b in zip(x, y, strict=True))


def test_eval_pixels_are_resize_then_center_crop(bench: Benchmark) -> None:
    path = bench.test.paths[0]
    pixels = images.load_eval_pixels(path, images.Preprocess(SIZE))
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    train = images.load_train_pixels(path, images.Preprocess(SIZE))
    assert min(train.shape[:2]) == images.resize_side(SIZE)
    offset = (images.resize_side(SIZE) - SIZE) // 2
    assert np.array_equal(pixels, train[offset:offset + SIZE, offset:offset + SIZE])  # square sources


def test_cache_is_reused_and_keyed_by_size(bench: Benchmark) -> None:
    images.build_loaders(bench, _data(), BATCH, seed=0)
    cache = bench.root / "cache" / f"train-{SIZE}px-v{images.CACHE_VERSION}.arrow"
    stamp = cache.stat().st_mtime_ns
    images.build_loaders(bench, _data(), BATCH, seed=0)
    assert cache.stat().st_mtime_ns == stamp
    images.build_loaders(bench, DataConfig(image_size=24, num_workers=0), BATCH, seed=0)
    assert (bench.root / "cache" / f"train-24px-v{images.CACHE_VERSION}.arrow").is_file()
    assert not list((bench.root / "cache").glob(".*tmp*"))


def test_corrupt_image_names_the_file_or_is_skipped_with_the_flag(built: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(built, tmp_path / built.name, ignore=shutil.ignore_patterns("cache")))
    bench = load_benchmark(copy)
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(bench.test.paths[1].read_bytes()[:150])
    test = Split(bench.test.image_ids, [*bench.test.paths[:1], victim, *bench.test.paths[2:]],
                    bench.test.observed, bench.test.full)
    bench = Benchmark(bench.root, bench.card, bench.class_names, bench.train, bench.val, test)
    with pytest.raises(BenchmarkError, match="corrupt image") as info:
        images.build_loaders(bench, _data(), BATCH, seed=0)
    assert str(victim) in str(info.value)
    assert not list((copy / "cache").glob("test-*.arrow"))  # nothing half-written
    loaders = images.build_loaders(bench, _data(skip_bad_images=True), BATCH, seed=0)
    dataset = loaders["test"].dataset
    assert len(dataset) == len(test) - 1 and dataset.cache.skipped[0]["file"] == str(victim)
    assert torch.equal(dataset[1][1], torch.from_numpy(test.observed[2].astype(np.float32)))


def test_reseeding_the_loader_generator_pins_the_epoch(bench: Benchmark) -> None:
    """engine.fit reseeds `loader.generator` before each epoch; batches then depend on that seed only."""
    a = images.build_loaders(bench, _data(), BATCH, seed=0)["train"]
    b = images.build_loaders(bench, _data(num_workers=2), BATCH, seed=0)["train"]
    runs = []
    for loader in (a, b):
        epochs = []
        for epoch in (1, 2, 1):
            loader.generator.manual_seed(100_003 + epoch)
            epochs.append(_epoch(loader)[0][0])
        runs.append(epochs)
    (a1, a2, a1_again), (b1, b2, b1_again) = runs
    assert torch.equal(a1, a1_again) and not torch.equal(a1, a2)
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(b1, b1_again)


@pytest.mark.parametrize("damage", ["truncated cache", "missing meta file", "meta file not JSON"])
def test_a_damaged_cache_is_named_and_rebuilt(damage: str, built: Path, tmp_path: Path, caplog) -> None:
    """Issue 13 row 'damaged caches': a real truncated Arrow file or a broken meta file -> a warning naming the file,
    then the cache is rebuilt and gives the same tensors as decoding."""
    copy = load_benchmark(Path(shutil.copytree(built, tmp_path / built.name, ignore=shutil.ignore_patterns("cache"))))
    images.build_loaders(copy, _data(), BATCH, seed=0)
    cache = copy.root / "cache" / f"val-{SIZE}px-v{images.CACHE_VERSION}.arrow"
    meta = cache.with_name(cache.name + ".json")
    if damage == "truncated cache":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif damage == "missing meta file":
        meta.unlink()
    else:
        meta.write_text("{not json")
    with caplog.at_level("WARNING", logger="comic.data.images"):
        rebuilt = images.build_loaders(copy, _data(), BATCH, seed=0)
    assert any(str(cache) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records), caplog.text
    decoded = images.build_loaders(copy, _data(), BATCH, seed=0, cache=False)
    for x, y in zip(_epoch(rebuilt["val"]), _epoch(decoded["val"]), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(x, y, strict=True))
