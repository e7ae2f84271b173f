"""Command line of the benchmark builders: `python -m comic.data build {plt-voc,plt-coco,coco-format,synthetic}`.

Parses options, turns them into `data.*` config values (validated like any override) and calls
`comic.data.build.build_benchmark`; prints the dataset card summary and the output directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from comic.config import Config, DataConfig, apply_overrides, load_config
from comic.data import sources
from comic.data.build import build_benchmark
from comic.data.reader import CARD_MD, BenchmarkError
from comic.presets import PRESETS
from comic.progress import finished, script_main

EPILOG = """\
sources:
  plt-voc      --root VOCdevkit (holding VOC2012/ and VOC2007/), or --voc2012 DIR --voc2007 DIR.
               Pool: VOC2012 trainval, labels from the XML files (difficult objects included);
               test: VOC2007 test, labels from ImageSets/Main/<class>_test.txt flags (1 = positive).
  plt-coco     --root COCO (annotations/instances_train2017.json + train2017/ as the pool,
               annotations/instances_val2017.json + val2017/ as the test set).
  coco-format  --root DIR (annotations/instances_train.json, train/, annotations/instances_test.json, test/),
               or --train-json F --train-images DIR --test-json F --test-images DIR. Any COCO-format data;
               use --longtail none for data that is already long-tailed and --missing-rate 0 for data that
               is already partially labelled.
  voc          --root VOCdevkit --year 2007 --train-set devtrain --test-set devtest: any VOC tree and set names.
               Labels from the ImageSets/Main/<class>_<set>.txt flags of each set: the pool counts flag 1 or 0
               (difficult included, like the XML rule), the test set flag 1. Defaults: year 2007, trainval / test.
  synthetic    no source needed: a procedural COCO-format source (--synthetic-images, --synthetic-test-images,
               --synthetic-classes; seeded by --split-seed) is generated under --out, then built like coco-format.

defaults come from the config preset of the same name (coco-format: the config defaults):
  synthetic  max-count 400, pareto-b 6, val-size 200      plt-voc   max-count 1400, pareto-b 12, val-size 2000
  plt-coco   max-count 1400, pareto-b 10, val-size 2000   all: missing-rate 0.4, split-seed 0, min-count 1

PLT-COCO and the paper's 2,962 images: the published script seeds Python's RNG once and builds VOC before COCO,
so its COCO subset is drawn from an RNG already advanced by the VOC build. --rng-after-voc PATH (a VOC2012 folder
or a VOC2012 trainval label CSV) reproduces that order and is the variant meant to give 2,962 images; without it
the COCO sampler is seeded afresh with --split-seed. Neither is verified here (no COCO labels).

The output directory <out>/<kind>-<hash> is named by a hash of all parameters and of the source annotation files;
rerunning with the same inputs does no work. Examples:
  python -m comic.data build synthetic
  python -m comic.data build plt-voc --root ~/data/VOCdevkit --missing-rate 0.3
  python -m comic.data build plt-coco --root ~/data/coco --rng-after-voc ~/data/VOCdevkit/VOC2012
  python -m comic.data build voc --root ~/data/VOCdevkit --year 2007 --train-set devtrain --test-set devtest \
      --longtail none --val-size 300
"""

# Options whose dest is the name of a DataConfig field.
_DATA_OPTIONS = ("missing_rate", "split_seed", "val_size", "max_count", "min_count", "pareto_b", "synthetic_images",
                 "synthetic_test_images", "synthetic_classes", "folds", "fold")
# voc: option -> DataConfig field.
_VOC_OPTIONS = {"year": "voc_year", "train_set": "voc_train_set", "test_set": "voc_test_set"}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comic.data", description="COMIC Lab data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build", help="build a PLT benchmark (Parquet manifest + dataset card)", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a partial-label long-tailed benchmark: Pareto long-tail training subset with "
                    "dropped positives, a validation split from unused source train images (full labels) and the "
                    "source test set.")
    build.add_argument("kind", choices=["plt-voc", "plt-coco", "coco-format", "voc", "synthetic"])
    _add_split_options(build.add_argument_group("benchmark parameters"))
    _add_source_options(build.add_argument_group("source locations"))
    return parser


def _add_split_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--missing-rate", type=float, help="probability of dropping each train positive, in [0, 1)")
    group.add_argument("--split-seed", type=int, help="seed of the subsample, the dropped labels and the val split")
    group.add_argument("--val-size", type=int, help="validation images drawn from pool images not used for training")
    group.add_argument("--longtail", choices=["pareto", "none"],
                       help="Pareto subsample, or keep the whole pool (less the --val-size validation images)")
    group.add_argument("--max-count", type=int, help="Pareto: images of the largest class")
    group.add_argument("--min-count", type=int, help="Pareto: images of the smallest class (default 1)")
    group.add_argument("--pareto-b", type=float, help="Pareto shape b (larger: flatter)")
    group.add_argument("--folds", type=int, help="k >= 2: cut the pool and test images together into k disjoint test "
                                                 "folds (train / val from the other folds); default 0: no folds")
    group.add_argument("--fold", type=int, help="with --folds k: the test fold, 0 .. k-1 (default 0)")
    group.add_argument("--skip-bad-images", action="store_true",
                       help="skip missing or corrupt images (counted in the card) instead of failing")
    group.add_argument("--out", help="folder under which <kind>-<hash>/ is written (default: data.cache_dir, "
                                     f"'{DataConfig().cache_dir}')")
    group.add_argument("-q", "--quiet", action="store_true", help="log warnings only")


def _add_source_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--root", help="source folder (see 'sources' below)")
    group.add_argument("--voc2012", help="plt-voc: the VOC2012 folder (pool)")
    group.add_argument("--voc2007", help="plt-voc: the VOC2007 folder holding the test set")
    for split in ("train", "test"):
        group.add_argument(f"--{split}-json", help=f"coco-format: {split} instances JSON")
        group.add_argument(f"--{split}-images", help=f"coco-format: folder of the {split} images")
    group.add_argument("--rng-after-voc", metavar="PATH",
                       help="plt-coco compatibility: advance the Pareto RNG with a VOC build first (VOC2012 folder "
                            "or label CSV); the variant meant to give the paper's 2,962 images")
    group.add_argument("--voc-max-count", type=int, default=1400, help="--rng-after-voc: VOC max count (1400)")
    group.add_argument("--voc-pareto-b", type=float, default=12.0, help="--rng-after-voc: VOC Pareto b (12)")
    group.add_argument("--year", type=int, help="voc: the VOC<year> folder under --root (default 2007)")
    group.add_argument("--train-set", help="voc: the ImageSets/Main set of the train pool (default trainval)")
    group.add_argument("--test-set", help="voc: the ImageSets/Main set of the test images (default test)")
    group.add_argument("--synthetic-images", type=int, help="synthetic: pool images (default 1200)")
    group.add_argument("--synthetic-test-images", type=int, help="synthetic: test images (default 400)")
    group.add_argument("--synthetic-classes", type=int, help="synthetic: number of classes (default 20)")


def data_config(args: argparse.Namespace) -> DataConfig:
    """The preset's data config with the given options applied (validated; errors name the data.* key)."""
    cfg = load_config(args.kind) if args.kind in PRESETS else apply_overrides(Config(), {"data.benchmark": args.kind})
    overrides = {f"data.{name}": getattr(args, name) for name in _DATA_OPTIONS
                 if getattr(args, name) is not None}
    overrides |= {f"data.{key}": getattr(args, option) for option, key in _VOC_OPTIONS.items()
                  if getattr(args, option) is not None}
    if args.longtail:
        overrides["data.longtail"] = args.longtail
    if args.skip_bad_images:
        overrides["data.skip_bad_images"] = True
    if args.out:
        overrides["data.cache_dir"] = args.out
    if args.root:
        overrides["data.root"] = args.root
    return apply_overrides(cfg, overrides).data


def source_for(args: argparse.Namespace, data: DataConfig):
    """The Source from explicit path options, else from data.root (config conventions)."""
    if args.kind == "synthetic" and args.root:
        raise BenchmarkError("--root: the synthetic source is generated; use coco-format to build from a folder")
    if args.kind == "plt-voc" and (args.voc2012 or args.voc2007):
        if not (args.voc2012 and args.voc2007):
            raise BenchmarkError("--voc2012 and --voc2007 must be given together (or --root VOCdevkit)")
        return sources.plt_voc_source(args.voc2012, args.voc2007)
    explicit = [args.train_json, args.train_images, args.test_json, args.test_images]
    if args.kind == "coco-format" and any(explicit):
        if not all(explicit):
            raise BenchmarkError("--train-json, --train-images, --test-json and --test-images go together "
                                    "(or --root)")
        return sources.coco_format_source(*explicit)
    return sources.source_from_config(data)


def build(args: argparse.Namespace) -> Path:
    data = data_config(args)
    if args.rng_after_voc and data.longtail != "pareto":
        raise BenchmarkError("--rng-after-voc only applies with --longtail pareto")
    extra = {}
    if args.rng_after_voc:
        extra = {"rng_after_voc": str(Path(args.rng_after_voc).expanduser().resolve()),
                 "voc_max_count": args.voc_max_count, "voc_pareto_b": args.voc_pareto_b}
    params = sources.BuildParams.from_config(data, **extra)
    return build_benchmark(source_for(args, data), params, data.cache_dir)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return script_main(lambda: _build_and_show(args), level=logging.WARNING if args.quiet else logging.INFO,
                       interrupted=lambda: "interrupted; nothing half-written is kept: run the command again")


def _build_and_show(args: argparse.Namespace) -> int:
    out = build(args)
    finished(None)
    print((out / CARD_MD).read_text())
    print(f"benchmark: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
