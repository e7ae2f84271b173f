"""Training-loader throughput: decoded-image cache vs decoding the JPEG files for every item.

Builds a synthetic COCO-format source with COCO-like image sizes (default 480 px, crop 224), then times full epochs
of the training DataLoader with `cache=True` and `cache=False`, interleaved round by round so both see the same
machine load, and prints the median images/s of each and their ratio (target: the cache >= 3x faster).

    python benchmarks/data_loader.py                 # COCO-like: 480 px sources, 224 crops
    python benchmarks/data_loader.py --smoke-test    # seconds; checks that the script runs
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from comic.config import DataConfig
from comic.data import synthetic
from comic.data.build import build_benchmark
from comic.data.images import build_loaders
from comic.data.reader import load_benchmark
from comic.data.sources import BuildParams, coco_root_source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320, help="training images (default 320)")
    parser.add_argument("--source-size", type=int, default=480, help="side of the generated JPEGs (default 480)")
    parser.add_argument("--image-size", type=int, default=224, help="crop size S (default 224)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0: main process)")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per mode (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--dir", help="work folder to keep (default: a temporary folder, removed at the end)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, one round: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.images, args.source_size, args.image_size, args.batch_size, args.rounds = 48, 160, 64, 16, 1
    return args


def make_benchmark(work: Path, args: argparse.Namespace) -> Path:
    """A synthetic benchmark whose training split is the whole generated pool."""
    source = synthetic.ensure_source(work, args.images, 8, 20, seed=0, image_size=args.source_size)
    params = BuildParams(longtail="none", missing_rate=0.4, val_size=0)
    return build_benchmark(coco_root_source(source, kind="synthetic"), params, work)


def epoch_rate(loader: torch.utils.data.DataLoader) -> float:
    """Images per second over one full pass of `loader`."""
    start, seen = time.perf_counter(), 0
    for images, _, _ in loader:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def run(work: Path, args: argparse.Namespace) -> None:
    bench = load_benchmark(make_benchmark(work, args))
    data = DataConfig(image_size=args.image_size, num_workers=args.workers, cache_dir=str(work))
    t0 = time.perf_counter()
    loaders = {mode: build_loaders(bench, data, args.batch_size, seed=0, cache=(mode == "cache"))["train"]
               for mode in ("cache", "decode")}
    print(f"cache built in {time.perf_counter() - t0:.1f} s (one-time cost, all splits)")
    rates: dict[str, list[float]] = {"cache": [], "decode": []}
    for loader in loaders.values():
        epoch_rate(loader)  # warm-up: page cache, worker start, allocator
    for _ in range(args.rounds):
        for mode, loader in loaders.items():
            rates[mode].append(epoch_rate(loader))
    cache, decode = (statistics.median(rates[m]) for m in ("cache", "decode"))
    print(f"train loader, {len(bench.train)} images of {args.source_size} px, crop {args.image_size}, "
          f"batch {args.batch_size}, workers {args.workers}, torch threads {torch.get_num_threads()}, "
          f"median of {args.rounds} epochs:")
    print(f"  cache  : {cache:8.1f} img/s")
    print(f"  decode : {decode:8.1f} img/s")
    print(f"  ratio  : {cache / decode:8.2f}x  (target >= 3x)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        run(Path(args.dir), args)
        return
    with tempfile.TemporaryDirectory(prefix="comic-loader-bench-") as work:
        run(Path(work), args)


if __name__ == "__main__":
    main()
