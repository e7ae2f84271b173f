"""The frozen-trunk fast path, measured side by side in one run: trunk images/s of three trunks vs one shared trunk,
a training epoch on images (profile released) vs on cached trunk features (profile frozen), the feature extraction,
and one whole COMIC trial on the cache. The last line reads
    shared_trunk_speedup=<x> cached_epoch_speedup=<y> cached_trial_s=<z>

  python benchmarks/frozen_trunk.py --voc-root ../shared/data/voc2007-dev/VOCdevkit \\
      --weights ../shared/data/weights/mobilenet_v2-b0353104.pth          # MobileNetV2, 224 px, real VOC photos
  python benchmarks/frozen_trunk.py --backbone resnet50 --weights imagenet --device cuda --amp bf16 \\
      --coco-sized --packed 4                                                 # a GPU: PLT-COCO-sized, 4 trials at once
  python benchmarks/frozen_trunk.py --smoke-test                              # synthetic, tiny trunk: a minute

`--coco-sized` uses a synthetic benchmark of PLT-COCO's size (2,962 train, 2,000 val, 5,000 test images); `--packed N`
also runs N cached trials at once (separate processes) and reports trials per hour.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from comic.config import Config, apply_overrides, load_config, to_dict
from comic.data.build import ensure_benchmark
from comic.data.features import prepare_features
from comic.data.images import build_loaders
from comic.data.reader import load_benchmark
from comic.device import device_name, setup_runtime, synchronize
from comic.engine import fit
from comic.models import ComicNet

COCO_SIZED = {"data.synthetic_images": 9000, "data.synthetic_test_images": 5000, "data.synthetic_classes": 80,
              "data.max_count": 1400, "data.pareto_b": 10.0, "data.val_size": 2000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc-root", help="a VOCdevkit with VOC2007 sets devtrain / devtest (real photos)")
    parser.add_argument("--coco-sized", action="store_true", help="a synthetic benchmark of PLT-COCO's size")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="imagenet", help="imagenet (hub cache), a file, or none")
    parser.add_argument("--size", type=int, default=224, help="image size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the cached trial")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per trunk variant")
    parser.add_argument("--packed", type=int, default=0, metavar="N", help="also run N cached trials at once")
    parser.add_argument("--cache-dir", help="benchmark and cache folder (default: a temporary one)")
    parser.add_argument("--smoke-test", action="store_true", help="synthetic data, tiny trunk, 32 px: a minute")
    return parser.parse_args(argv)


def config(args: argparse.Namespace, cache_dir: str) -> Config:
    if args.smoke_test:
        return load_config("synthetic", {
            "data.synthetic_images": 300, "data.synthetic_test_images": 100, "data.val_size": 50,
            "data.max_count": 120, "data.image_size": 32, "data.num_workers": 0, "model.backbone": "tiny",
            "model.weights": "none", "model.feat_dim": 64, "model.profile": "frozen", "train.epochs": 3,
            "data.cache_dir": cache_dir, "engine.progress": False, "engine.device": "cpu"})
    common = {"model.backbone": args.backbone, "model.weights": args.weights, "model.profile": "frozen",
              "data.image_size": args.size, "data.cache_dir": cache_dir, "train.epochs": args.epochs,
              "engine.device": args.device, "engine.amp": args.amp, "engine.progress": False}
    if args.coco_sized:
        return load_config("plt-coco", common | COCO_SIZED | {"data.benchmark": "synthetic"})
    if not args.voc_root:
        raise SystemExit("error: give --voc-root VOCdevkit (real photos), --coco-sized, or --smoke-test")
    return load_config("voc2007-dev", common | {"data.root": str(Path(args.voc_root).resolve())})


def trunk_rates(cfg: Config, batches: int) -> tuple[float, float]:
    """Images/s through the trunks of a COMIC net in train mode: three frozen trunks (one per model) vs one shared."""
    rt = setup_runtime(cfg.engine, seed=0)
    bench = load_benchmark(ensure_benchmark(cfg.data))
    loader = build_loaders(bench, cfg.data, cfg.train.batch_size, seed=0)["train"]
    released = apply_overrides(cfg, {"model.profile": "released"})
    three = ComicNet(apply_overrides(released, {"model.profile": "finetune"}).model, bench.num_classes)
    shared = ComicNet(released.model, bench.num_classes)
    rates = []
    for net in (three, shared):
        net = net.to(rt.device).train().requires_grad_(False)
        seen, start = 0, time.perf_counter()
        for i, (batch, _, _) in enumerate(loader):
            if i == 2:  # two warm-up batches
                synchronize(rt)
                start = time.perf_counter()
            with torch.no_grad(), rt.autocast():
                net.trunks(rt.inputs_to_device(batch))
            seen += len(batch) if i >= 2 else 0
            if i >= batches + 1:
                break
        synchronize(rt)
        rates.append(seen / (time.perf_counter() - start))
    return rates[0], rates[1]


def epoch_seconds(cfg: Config) -> float:
    """Seconds of the first training epoch (`perf/epoch_s`: training only, no evaluation)."""
    return fit(apply_overrides(cfg, {"train.epochs": 1})).history[0]["perf/epoch_s"]


def packed_trials(cfg: Config, n: int, cache_dir: str) -> float:
    """Trials per hour when `n` cached trials (seeds 0..n-1) run at once as separate processes on one cache."""
    config_file = Path(cache_dir) / "packed.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    script = Path(__file__).resolve().parents[1] / "experiments" / "train.py"
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(script), "--config", str(config_file), f"seed={i}",
                               "--tracking-uri", f"sqlite:///{cache_dir}/packed-{i}.db", "--workdir",
                               f"{cache_dir}/packed-{i}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(n)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"a packed trial failed: exit codes {codes}")
    return n * 3600 / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or tmp
        cfg = config(args, cache_dir)
        print(f"device: {device_name(setup_runtime(cfg.engine, 0).device)}; {cfg.model.backbone} "
              f"({cfg.model.weights}), {cfg.data.image_size} px, torch {torch.__version__}", flush=True)
        three, shared = trunk_rates(cfg, args.batches)
        print(f"trunk forward, train mode: three trunks {three:.1f} img/s, one shared {shared:.1f} img/s", flush=True)
        start = time.perf_counter()
        cache = prepare_features(cfg)
        print(f"feature extraction: {time.perf_counter() - start:.1f} s for {cache.meta['shapes']}", flush=True)
        image_epoch = epoch_seconds(apply_overrides(cfg, {"model.profile": "released"}))
        cached_epoch = epoch_seconds(cfg)
        print(f"training epoch: images {image_epoch:.2f} s, cached features {cached_epoch:.3f} s", flush=True)
        start = time.perf_counter()
        trial = fit(cfg)
        trial_s = time.perf_counter() - start
        print(f"cached trial: {cfg.train.epochs} epochs in {trial_s:.1f} s, best test mAP "
              f"{trial.metrics['best/test/map']:.2f}", flush=True)
        if args.packed:
            print(f"packed: {args.packed} trials at once, {packed_trials(cfg, args.packed, cache_dir):.0f} "
                  "trials per hour", flush=True)
    print(f"shared_trunk_speedup={shared / three:.2f} cached_epoch_speedup={image_epoch / cached_epoch:.1f} "
          f"cached_trial_s={trial_s:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
