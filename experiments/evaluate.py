"""Evaluate a trained model on a benchmark's test (or val) split, from its image files, and record it in MLflow.

Examples:
  python experiments/evaluate.py --model models:/comic-voc2007-dev-lt@champion     # on the benchmark it was trained on
  python experiments/evaluate.py --model runs:/<run id>                              # the model that run logged
  python experiments/evaluate.py --model outputs/comic-1a2b3c/model --split val      # an exported model folder
  python experiments/evaluate.py --model <uri> --preset voc2007-dev --data ~/data/VOCdevkit   # another benchmark
  python experiments/evaluate.py --smoke-test                                        # trains a tiny model first

The metrics are the training run's (`test/map`, per shot group, recall, the head / tail models' mAP), with shot groups
from the *model's* training counts; the per-class table is printed. Without --preset, --data, --config or overrides
the model's own benchmark is used; otherwise those build the benchmark (its classes must be the model's), and the
model keeps its own preprocessing (`data.image_size`). The evaluation is an MLflow run (experiment `comic-evaluate`)
tagged with the model's URI and its training run, with the benchmark as its dataset.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from comic._io import UserError
from comic.cli import base_config, config_flags, parse, tracking_flags
from comic.config import absolute_paths, apply_overrides
from comic.data.build import ensure_benchmark
from comic.data.images import build_loaders, trunk_preprocess
from comic.data.reader import load_benchmark
from comic.device import setup_runtime
from comic.engine import evaluate
from comic.inference.bundle import ModelBundle
from comic.metrics import shot_groups
from comic.progress import script_main
from comic.report.tables import RUN_GROUPS, text
from comic.tracking.client import RunTracker
from comic.tracking.model import MODEL_URI_TAG, bundle_path, link_model_input
from comic.tracking.run import log_benchmark, smoke_model
from comic.tracking.store import resolve_tracking_uri

EVAL_BATCH = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[config_flags("train a tiny synthetic model, then evaluate it"),
                                              tracking_flags("comic-evaluate")])
    parser.set_defaults(preset=None)  # none given: the model's own benchmark
    group = parser.add_argument_group("this evaluation")
    group.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model id>, runs:/<run id>, "
                                       "or a model folder / comic_model.pt file")
    group.add_argument("--split", choices=("test", "val"), default="test", help="which split (default test)")
    group.add_argument("--run-name", help="MLflow run name (default: eval-<benchmark>)")
    group.add_argument("--device", default="auto", help="torch device (default auto: CUDA when there is one); torch "
                                                        "threads: the CPUs this process owns")
    args = parse(parser, argv)
    if not args.model and not args.smoke_test:
        parser.error("--model is required (or --smoke-test)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return script_main(lambda: _smoke(args) if args.smoke_test else run(args))


def _smoke(args: argparse.Namespace) -> int:
    """Train a tiny synthetic model with its model logged in a temporary folder, then evaluate it there."""
    with tempfile.TemporaryDirectory(prefix="comic-evaluate-") as tmp:
        args.model, args.tracking_uri = smoke_model(Path(tmp))
        return run(args)


def run(args: argparse.Namespace) -> int:
    uri = resolve_tracking_uri(args.tracking_uri)
    path = bundle_path(args.model, uri)
    bundle = ModelBundle.load(path)
    data = _data_config(args, bundle)
    bench = load_benchmark(ensure_benchmark(data))
    if list(bench.class_names) != list(bundle.class_names):
        raise UserError(f"{bench.root.name} has classes {bench.class_names[:5]}..., the model "
                        f"{bundle.class_names[:5]}...: a model is evaluated on a benchmark of its own classes")
    # The training run's execution keys (its device, threads) are not this machine's.
    engine = apply_overrides(bundle.cfg, {"engine.device": args.device, "engine.threads": 0}).engine
    rt = setup_runtime(engine, bundle.cfg.seed)
    network = bundle.network().to(rt.device)
    prep = trunk_preprocess(bundle.cfg.model, data.image_size)
    loader = build_loaders(bench, data, EVAL_BATCH, bundle.cfg.seed, prep=prep)[args.split]
    counts = np.asarray(bundle.train_counts)
    metrics, ap = evaluate(network, loader, rt, counts, args.split)
    print(f"{args.model} on {bench.root.name} ({args.split}, {len(loader.dataset)} images):")
    table = _per_class(bundle, ap, counts)
    print(_summary(metrics, args.split))
    print(text(table))
    run_id = _record(args, uri, bundle, bench, metrics, table)
    print(f"MLflow evaluation run {run_id} in {uri}")
    return 0


def _data_config(args: argparse.Namespace, bundle: ModelBundle):
    """The model's own data config, or the one --preset / --data / --config / overrides describe (image size: the
    model's, its preprocessing)."""
    if args.preset is None and not (args.data or args.config or args.overrides):
        return bundle.cfg.data
    args.preset = args.preset or "synthetic"
    cfg = absolute_paths(base_config(args))
    return apply_overrides(cfg, {"data.image_size": bundle.image_size}).data


def _summary(metrics: dict[str, float], split: str) -> str:
    """mAP total / per shot group / average and recall, as training's console summary prints them."""
    columns = {**RUN_GROUPS, "recall": "recall"}
    values = [metrics.get(f"{split}/{key}", math.nan) for key in columns.values()]
    row = [split, *(f"{v:.2f}" if math.isfinite(v) else "-" for v in values)]
    return text(pd.DataFrame([row], columns=["", *columns]))


def _per_class(bundle: ModelBundle, ap: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    """One row per class: training count (the model's), shot group, AP (%), decision threshold."""
    return pd.DataFrame({"class": bundle.class_names, "train_observed": counts.astype(int),
                         "group": shot_groups(counts), "ap": np.round(100.0 * ap, 2),
                         "threshold": np.round(bundle.thresholds, 4)})


def _record(args, uri: str, bundle: ModelBundle, bench, metrics: dict[str, float], table: pd.DataFrame) -> str:
    source_run = bundle.provenance.get("run_id", "")
    tags = {MODEL_URI_TAG: args.model, "source_run_id": source_run, "split": args.split,
            "method": bundle.cfg.method, "dataset_name": bench.root.name}
    with RunTracker(uri, args.experiment, run_name=args.run_name or f"eval-{bench.root.name}", tags=tags) as tracker:
        log_benchmark(tracker, bench.root, "eval")
        link_model_input(tracker, args.model)
        tracker.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, step=0)
        tracker.log_table(table, "per_class_ap")
        return tracker.run_id


if __name__ == "__main__":
    sys.exit(main())
