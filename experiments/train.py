"""Train one method once (no Ray) and record it in MLflow.

Examples:
  python experiments/train.py                                   # COMIC on the embedded synthetic benchmark (CPU)
  python experiments/train.py --preset plt-voc --data ~/data/VOCdevkit method=comic rlc.tau=0.8
  python experiments/train.py method=bce train.epochs=4 --metrics-out bce.json
  python experiments/train.py --smoke-test                      # seconds-scale end-to-end check

Overrides are dotted config keys (`key=value`); `--list-keys` prints every key with its default and meaning.
A run checkpoints each epoch into its work directory; rerunning the same command resumes it (same MLflow run).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from comic.config import PRESETS, SMOKE_OVERRIDES, ConfigError, config_hash, describe, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. method=bce rlc.tau=0.8")
    parser.add_argument("--preset", default="synthetic", choices=sorted(PRESETS), help="base configuration")
    parser.add_argument("--data", help="source data root (VOCdevkit / COCO root) or a built benchmark directory")
    parser.add_argument("--config", help="YAML file of config keys applied after the preset")
    parser.add_argument("--workdir", help="checkpoint directory (default: outputs/<method>-<config hash>)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                               "sqlite:///<cwd>/mlruns/mlflow.db)")
    parser.add_argument("--experiment", default="comic-train", help="MLflow experiment name")
    parser.add_argument("--run-name", help="MLflow run name (default: method and seed)")
    parser.add_argument("--metrics-out", help="write the final metrics as JSON to this file")
    parser.add_argument("--smoke-test", action="store_true", help="tiny synthetic data, 2 epochs, CPU: seconds")
    parser.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_keys:
        print(describe())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from comic.session import format_table, tracked_fit
    from comic.tracking import resolve_tracking_uri

    overrides = [f"{k}={v}" for k, v in SMOKE_OVERRIDES.items()] if args.smoke_test else []
    overrides += args.overrides
    if args.data:
        overrides.append(f"data.root={Path(args.data).expanduser().resolve()}")
    try:
        cfg = load_config(args.preset, overrides, path=args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    workdir = Path(args.workdir or Path("outputs") / f"{cfg.method}-{config_hash(cfg)}").resolve()
    uri = resolve_tracking_uri(args.tracking_uri)
    result, run_id = tracked_fit(cfg, tracking_uri=uri, experiment=args.experiment, workdir=workdir,
                                 run_name=args.run_name or f"{cfg.method}-seed{cfg.seed}")
    print(format_table(result.metrics))
    print(f"MLflow run {run_id} in {uri}\n  open the UI with: mlflow ui --backend-store-uri {uri}")
    if args.metrics_out:
        Path(args.metrics_out).write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
