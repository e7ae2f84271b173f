"""Train one method once (no Ray) and record it in MLflow.

Examples:
  python experiments/train.py                                   # COMIC on the embedded synthetic benchmark (CPU)
  python experiments/train.py --preset plt-voc --data ~/data/VOCdevkit method=comic rlc.tau=0.8
  python experiments/train.py method=bce train.epochs=4 --metrics-out bce.json
  python experiments/train.py --smoke-test                      # seconds-scale end-to-end check

Overrides are dotted config keys (`key=value`), before or after the flags; `--list-keys` prints every key with the
chosen preset's value and its meaning. A run checkpoints into its work directory (every train.checkpoint_every_s, at
the end and when interrupted; the best-on-val weights in checkpoint/best.pt), named by the run's
identity (what it computes: config and benchmark content, not paths, threads or workers); rerunning the same
command resumes it in the same MLflow run. At the end the best-on-val model is exported (`<workdir>/model/`) and
logged as the run's MLflow model: `experiments/evaluate.py`, `experiments/predict.py` and `mlflow models serve` use it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from comic.cli import base_config, config_flags, list_keys, parse, tracking_flags
from comic.config import absolute_paths, identity_hash
from comic.data.build import benchmark_digest
from comic.progress import finished, script_main
from comic.report.tables import run_summary
from comic.tracking.model import MODEL_DIR, MODEL_URI_TAG
from comic.tracking.run import tracked_fit
from comic.tracking.store import find_run, resolve_tracking_uri, run_link, ui_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[config_flags(), tracking_flags("comic-train")])
    group = parser.add_argument_group("this run")
    group.add_argument("--workdir", help="checkpoint directory (default: outputs/<method>-<run identity>)")
    group.add_argument("--run-name", help="MLflow run name (default: method and seed)")
    group.add_argument("--metrics-out", help="write the final metrics as JSON to this file")
    group.add_argument("--no-log-model", action="store_true",
                       help="do not export the best-on-val model nor log it as the run's MLflow model")
    return parse(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_keys:
        print(list_keys(args))
        return 0
    return script_main(lambda: train(args), interrupted=lambda: "interrupted; the last finished epoch is saved: "
                       "run the same command again to resume it")


def train(args: argparse.Namespace) -> int:
    cfg = absolute_paths(base_config(args))
    default = Path("outputs") / f"{cfg.method}-{identity_hash(cfg, dataset=benchmark_digest(cfg.data))}"
    workdir = Path(args.workdir or default).resolve()
    uri = resolve_tracking_uri(args.tracking_uri)
    result, run_id = tracked_fit(cfg, tracking_uri=uri, experiment=args.experiment, workdir=workdir,
                                 run_name=args.run_name or f"{cfg.method}-seed{cfg.seed}",
                                 log_model=not args.no_log_model)
    finished(None)
    if result.already_finished:
        print(f"already finished: {workdir} holds this run's {int(result.metrics['epoch'])} epochs; its results "
              "(nothing was trained; delete the work directory or pass another --workdir to train again):")
    print(run_summary(result.metrics))
    command = ui_command(uri)
    print(f"MLflow run {run_id} in {uri}" + (f"\n  open the UI with: {command}" if command else ""))
    found = find_run(uri, run_id)
    if found is not None:
        print(f"  its page: {run_link(uri, found.info.experiment_id, run_id)}")
        if MODEL_URI_TAG in found.data.tags:
            print(f"  its best-on-val model: {found.data.tags[MODEL_URI_TAG]} (also {workdir / MODEL_DIR})")
    if args.metrics_out:
        Path(args.metrics_out).write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
