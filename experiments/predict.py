"""Score image files with a trained model: one CSV row per image, a score column per class and the predicted labels.

Examples:
  python experiments/predict.py --model models:/comic-voc2007-dev-lt@champion photos/ --out predictions.csv
  python experiments/predict.py --model runs:/<run id> a.jpg b.png
  python experiments/predict.py --model outputs/comic-1a2b3c/model photos/ --device cuda --batch-size 64
  python experiments/predict.py --smoke-test

Folders are read recursively (hidden files left out). A file that cannot be read as an image (missing, truncated,
not an image) is named in a warning and skipped; the rest are still predicted, and the exit status is 1 when any was
skipped (2 for a usage error). Labels are the classes whose score reaches the model's per-class threshold (chosen on
the validation split of its training run); `--threshold` replaces them with one value for every class.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from comic._io import UserError, atomic_write
from comic.cli import tracking_flags
from comic.inference.bundle import ModelBundle
from comic.inference.predictor import Prediction, Predictor, image_files
from comic.progress import progress, script_main
from comic.tracking.model import bundle_path
from comic.tracking.run import smoke_model
from comic.tracking.store import resolve_tracking_uri

LABELS = "labels"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[tracking_flags(None)])
    parser.add_argument("paths", nargs="*", help="image files and folders")
    parser.add_argument("--model", help="models:/NAME@ALIAS, models:/<model id>, runs:/<run id>, or a model folder / "
                                        "comic_model.pt file")
    parser.add_argument("--out", help="CSV file to write (default: print the CSV)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threshold", type=float, help="one decision threshold for every class (default: the "
                                                        "model's per-class thresholds)")
    parser.add_argument("--smoke-test", action="store_true", help="train a tiny synthetic model, predict its images")
    args = parser.parse_args(argv)
    if not args.smoke_test and (not args.model or not args.paths):
        parser.error("give --model and at least one image file or folder (or --smoke-test)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return script_main(lambda: _smoke(args) if args.smoke_test else predict(args), level=logging.WARNING)


def _smoke(args: argparse.Namespace) -> int:
    """Train a tiny synthetic model in a temporary folder and predict the synthetic test images of its benchmark."""
    with tempfile.TemporaryDirectory(prefix="comic-predict-") as tmp:
        args.model, args.tracking_uri = smoke_model(Path(tmp))
        args.paths = sorted((Path(tmp) / "data").glob("*-source-*/test"))
        return predict(args)


def predict(args: argparse.Namespace) -> int:
    bundle = ModelBundle.load(bundle_path(args.model, resolve_tracking_uri(args.tracking_uri)))
    predictor = Predictor(bundle, args.device, args.batch_size)
    if args.threshold is not None:
        predictor.thresholds = np.full(len(predictor.class_names), args.threshold)
    files = image_files(args.paths)
    if not files:
        raise UserError(f"no files in {' '.join(map(str, args.paths))}")
    rows, skipped = [], []
    with progress(total=len(files), desc="predict", unit="img") as bar:
        for result in predictor.predict_many(files, names=[str(f) for f in files]):
            bar.update(1)
            if result.error is not None:
                print(f"warning: skipped {result.error}", file=sys.stderr)
                skipped.append(result.name)
            else:
                rows.append(result)
    _write(args.out, predictor, rows)
    print(f"predicted {len(rows)} of {len(files)} images" + (f"; skipped {len(skipped)} unreadable" if skipped
                                                             else "") + (f" -> {args.out}" if args.out else ""),
          file=sys.stderr)
    return 1 if skipped else 0


def _write(out: str | None, predictor: Predictor, rows: list[Prediction]) -> None:
    header = ["image", *predictor.class_names, LABELS]
    labels = predictor.labels(np.stack([r.scores for r in rows])) if rows else []
    lines = [[r.name, *(f"{s:.6f}" for s in r.scores), ";".join(names)] for r, names in zip(rows, labels, strict=True)]
    if out is None:
        writer = csv.writer(sys.stdout)
        writer.writerows([header, *lines])
        return

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            csv.writer(handle).writerows([header, *lines])

    atomic_write(out, write)


if __name__ == "__main__":
    sys.exit(main())
