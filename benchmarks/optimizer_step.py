"""The cached-feature training step (profile frozen: three COMIC heads on trunk features) with each of Adam's
implementations: torch's per-tensor loop (its default on a CPU), `foreach` (multi-tensor) and `fused` (what the trainer
uses on a CPU or a GPU). Measured side by side in one process on random features; prints steps/s and the ratios.

On a cached trial the heads are the whole model, so the optimizer's passes over their ~4M parameters are a large part
of each step: this is why the trainer asks for the fused kernel on a CPU as well.

  python benchmarks/optimizer_step.py                       # MobileNetV2-width features (1280), 20 classes, batch 32
  python benchmarks/optimizer_step.py --width 2048 --classes 80 --threads 2
  python benchmarks/optimizer_step.py --smoke-test          # a few steps, seconds
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

IMPLEMENTATIONS = {"per-tensor": {"foreach": False, "fused": None}, "foreach": {"foreach": True, "fused": None},
                   "fused": {"foreach": None, "fused": True}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1280, help="feature width (MobileNetV2 1280, ResNet-50 2048)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per implementation and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Ray trial with 1 CPU has 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke-test", action="store_true", help="a few steps of each, seconds")
    return parser.parse_args(argv)


def make_step(name: str, args: argparse.Namespace):
    """A training step of fresh, identically seeded heads with Adam implementation `name`."""
    cfg = load_config("voc2007-dev", {"model.weights": "none", "engine.device": args.device,
                                      "engine.threads": args.threads, "train.batch_size": args.batch})
    rt = setup_runtime(cfg.engine, seed=0)
    model = ComicNet(cfg.model, args.classes, args.width).to(rt.device)
    counts = torch.logspace(2.5, 0.5, args.classes)  # a long tail from ~300 to 3 images
    criterion = ComicCriterion.from_config(cfg, counts).to(rt.device)
    trainer_choice, _ = build_optimizer(model, cfg)
    groups = [{**group, **IMPLEMENTATIONS[name]} for group in trainer_choice.param_groups]
    optimizer = torch.optim.Adam(groups, **{**trainer_choice.defaults, **IMPLEMENTATIONS[name]})
    step = make_train_step(model, criterion, optimizer, cfg, rt)
    features = torch.randn(args.batch, args.width, device=rt.device)
    observed = (torch.rand(args.batch, args.classes) < 0.1).float().to(rt.device)
    model.train()
    criterion.start_epoch(1)
    return step, features, observed, rt


def steps_per_second(name: str, args: argparse.Namespace) -> float:
    step, features, observed, rt = make_step(name, args)
    for _ in range(3):  # warm-up: Adam's state is created on the first step
        step(features, observed)
    synchronize(rt)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(features, observed)
    synchronize(rt)
    return args.steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke_test:
        args.width, args.steps, args.rounds = 64, 3, 1
    print(f"device: {args.device}; COMIC heads on {args.width}-d features, {args.classes} classes, batch {args.batch}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    rates = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits every implementation
        for name in IMPLEMENTATIONS:
            rates[name].append(steps_per_second(name, args))
    median = {name: sorted(r)[len(r) // 2] for name, r in rates.items()}
    for name, rate in median.items():
        print(f"  adam {name:<11} {rate:8.1f} steps/s  {rate * args.batch:9.0f} img/s")
    base = median["per-tensor"]
    print(f"fused_vs_per_tensor={median['fused'] / base:.2f} foreach_vs_per_tensor={median['foreach'] / base:.2f}")


if __name__ == "__main__":
    main()
