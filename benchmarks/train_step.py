"""Throughput of the COMIC training step (three models, full loss, Adam update), eager vs torch.compile modes.

Measured side by side in one process on random images, so data loading is excluded: this is the trainer's ceiling.
Prints images/s per mode and the ratio to eager. Reference point (H100, three ResNet-50, batch 32, 224 px, bf16):
486 img/s eager, 1,372 img/s with `reduce-overhead` (after ~110 s of compile warm-up).

  python benchmarks/train_step.py                                  # resnet50, batch 32, 224 px, all modes
  python benchmarks/train_step.py --modes none default --steps 30
  python benchmarks/train_step.py --smoke-test                     # tiny backbone on CPU, seconds
"""

from __future__ import annotations

import argparse
import time

import torch

from comic.config import load_config
from comic.device import setup_runtime, synchronize
from comic.engine import build_optimizer, make_train_step
from comic.losses import ComicCriterion
from comic.models import ComicNet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50", help="any torchvision classification model, or tiny")
    parser.add_argument("--profile", default="finetune", choices=["finetune", "released"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps per mode (includes compilation)")
    parser.add_argument("--modes", nargs="+", default=["none", "default", "reduce-overhead"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke-test", action="store_true", help="tiny backbone, 32 px, CPU, eager only")
    return parser.parse_args(argv)


def measure(mode: str, args: argparse.Namespace) -> tuple[float, float]:
    """(images/s over the timed steps, seconds of warm-up) for one compile mode."""
    overrides = {"model.backbone": args.backbone, "model.weights": "none", "model.profile": args.profile,
                 "engine.compile": mode, "engine.device": args.device, "train.batch_size": args.batch}
    cfg = load_config("plt-coco", overrides)
    rt = setup_runtime(cfg.engine, seed=0)
    model = ComicNet(cfg.model, args.classes).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    counts = torch.logspace(3, 0.7, args.classes)  # a long tail from 1000 to 5 images
    criterion = ComicCriterion.from_config(cfg, counts).to(rt.device)
    optimizer, _ = build_optimizer(model, cfg)
    step = make_train_step(model, criterion, optimizer, cfg, rt)
    images = rt.inputs_to_device(torch.randn(args.batch, 3, args.size, args.size))
    observed = (torch.rand(args.batch, args.classes) < 0.05).float().to(rt.device)
    model.train()
    criterion.start_epoch(1)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step(images, observed)
    synchronize(rt)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step(images, observed)
    synchronize(rt)
    return args.batch * args.steps / (time.perf_counter() - start), warm


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke_test:
        args.backbone, args.size, args.batch, args.steps, args.warmup = "tiny", 32, 8, 3, 1
        args.modes, args.device = ["none"], "cpu"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(f"device: {device}; {args.backbone} x3 ({args.profile}), batch {args.batch}, {args.size} px, "
          f"{args.classes} classes, torch {torch.__version__}")
    results = {}
    for mode in args.modes:
        results[mode] = measure(mode, args)
        rate, warm = results[mode]
        print(f"  compile={mode:<16} {rate:9.1f} img/s   (warm-up {warm:6.1f} s)", flush=True)
    base = results.get("none", (None,))[0]
    if base:
        for mode, (rate, _) in results.items():
            print(f"  ratio {mode} / none: {rate / base:.2f}x")


if __name__ == "__main__":
    main()
