"""What a benchmark is built from: its source splits (where the labels and images are, how to read them) and the
parameters of the build. Folder conventions per benchmark kind:

- `plt-voc`: a VOCdevkit holding VOC2012/ (train pool, XML labels) and VOC2007/ (test set, ImageSets flags);
- `plt-coco`: a COCO 2017 folder (annotations/instances_{train,val}2017.json, train2017/, val2017/);
- `coco-format`: annotations/instances_{train,test}.json, train/, test/ (the synthetic source uses it too).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from comic._io import absolute_path
from comic.config import DataConfig
from comic.data.labels import (
    VOC_CLASSES,
    LabelSet,
    coco_labels,
    read_label_csv,
    voc_flag_labels,
    voc_test_labels,
    voc_train_labels,
)
from comic.data.reader import BenchmarkError
from comic.data.synthetic import ensure_source


@dataclass(frozen=True)
class LabelSource:
    """One source split: how to read its labels and where its images are.

    reader: 'coco' (instances JSON), 'voc-train' (XML rule), 'voc-test' (ImageSets flags, flag 1), 'voc-flags'
    (ImageSets flags, flag 1 or 0: the train rule read from the flags) or 'csv';
    path: the JSON, the VOC20xx folder or the CSV; image_root: the folder `LabelSet.file_names` are relative to.
    """

    reader: str
    path: Path
    image_root: Path
    image_set: str = ""

    def read(self) -> LabelSet:
        if self.reader == "coco":
            return coco_labels(self.path)
        if self.reader == "voc-train":
            return voc_train_labels(self.path, self.image_set or "trainval")
        if self.reader == "voc-test":
            return voc_test_labels(self.path, self.image_set or "test")
        if self.reader == "voc-flags":
            return voc_flag_labels(self.path, self.image_set, difficult_positive=True)
        if self.reader == "csv":
            return read_label_csv(self.path)
        raise BenchmarkError(f"unknown label reader {self.reader!r}")

    def annotation_files(self) -> list[Path]:
        """The files whose content determines the labels (checksummed into the benchmark hash)."""
        if self.reader in ("coco", "csv"):
            return [self.path]
        main = self.path / "ImageSets" / "Main"
        if self.reader in ("voc-test", "voc-flags"):
            return [main / f"{cls}_{self.image_set or 'test'}.txt" for cls in VOC_CLASSES]
        listing = main / f"{self.image_set or 'trainval'}.txt"
        ids = [line.split()[0] for line in _read_text(listing).splitlines() if line.strip()]
        return [listing] + [self.path / "Annotations" / f"{i}.xml" for i in ids]

    def describe(self) -> dict[str, str]:
        return {"reader": self.reader, "path": str(self.path), "image_root": str(self.image_root),
                "image_set": self.image_set}


@dataclass(frozen=True)
class Source:
    """A benchmark source: a train pool (train/val images come from it) and a test set."""

    kind: str
    pool: LabelSource
    test: LabelSource


def coco_format_source(train_json: str | Path, train_images: str | Path, test_json: str | Path,
                       test_images: str | Path, kind: str = "coco-format") -> Source:
    """Any COCO-format train/test instances JSON with their image folders."""
    return Source(kind, LabelSource("coco", absolute_path(train_json), absolute_path(train_images)),
                  LabelSource("coco", absolute_path(test_json), absolute_path(test_images)))


def coco_root_source(root: str | Path, kind: str = "coco-format") -> Source:
    """The `coco-format` folder convention: annotations/instances_{train,test}.json, train/, test/."""
    root = absolute_path(root)
    return coco_format_source(root / "annotations" / "instances_train.json", root / "train",
                              root / "annotations" / "instances_test.json", root / "test", kind)


def plt_coco_source(root: str | Path) -> Source:
    """PLT-COCO: COCO 2017 under `root` (annotations/instances_{train,val}2017.json, train2017/, val2017/)."""
    root = absolute_path(root)
    ann = root / "annotations"
    return coco_format_source(ann / "instances_train2017.json", root / "train2017", ann / "instances_val2017.json",
                              root / "val2017", kind="plt-coco")


def plt_voc_source(voc2012: str | Path, voc2007: str | Path) -> Source:
    """PLT-VOC: VOC2012 trainval (XML labels) as the pool, VOC2007 test (ImageSets flags) as the test set."""
    voc2012, voc2007 = absolute_path(voc2012), absolute_path(voc2007)
    return Source("plt-voc", LabelSource("voc-train", voc2012, voc2012, "trainval"),
                  LabelSource("voc-test", voc2007, voc2007, "test"))


def voc_source(root: str | Path, year: int, train_set: str, test_set: str) -> Source:
    """Any VOC tree: the pool is `VOC<year>`'s `train_set`, the test images its `test_set`, labels from the
    ImageSets flags of each set (pool: flag 1 or 0, difficult included as in the train rule; test: flag 1)."""
    voc = absolute_path(root) / f"VOC{year}"
    return Source("voc", LabelSource("voc-flags", voc, voc, train_set), LabelSource("voc-test", voc, voc, test_set))


def source_from_config(data: DataConfig) -> Source:
    """The source `data` describes; for `synthetic` with an empty root, the generated source (made if missing)."""
    root = data.root
    if data.benchmark == "synthetic" and not root:
        root = str(ensure_source(data.cache_dir, data.synthetic_images, data.synthetic_test_images,
                                 data.synthetic_classes, data.split_seed))
    if not root:
        raise BenchmarkError(f"data.root is empty: benchmark '{data.benchmark}' needs its source folder "
                             f"({_ROOT_HELP[data.benchmark]}) or a built benchmark directory")
    if data.benchmark == "plt-voc":
        return plt_voc_source(Path(root) / "VOC2012", Path(root) / "VOC2007")
    if data.benchmark == "plt-coco":
        return plt_coco_source(root)
    if data.benchmark == "voc":
        return voc_source(root, data.voc_year, data.voc_train_set, data.voc_test_set)
    return coco_root_source(root, kind=data.benchmark)


_ROOT_HELP = {
    "plt-voc": "a VOCdevkit folder holding VOC2012/ and VOC2007/",
    "plt-coco": "a COCO folder holding annotations/instances_{train,val}2017.json, train2017/, val2017/",
    "coco-format": "a folder holding annotations/instances_{train,test}.json, train/, test/",
    "voc": "a VOCdevkit folder holding VOC<year>/ (data.voc_year) with the ImageSets of data.voc_train_set and "
           "data.voc_test_set",
    "synthetic": "empty: the source is generated",
}


@dataclass(frozen=True)
class BuildParams:
    """Everything besides the source that determines a benchmark (all of it goes into the hash).

    `rng_after_voc`: a VOC2012 folder or VOC label CSV; when set, the Pareto RNG is first used for a VOC build
    (`voc_max_count`, `voc_pareto_b`) and then continues for this build, as the published script does.
    """

    longtail: str = "pareto"
    max_count: int = 1400
    min_count: int = 1
    pareto_b: float = 12.0
    missing_rate: float = 0.4
    split_seed: int = 0
    val_size: int = 2000
    skip_bad_images: bool = False
    rng_after_voc: str = ""
    voc_max_count: int = 1400
    voc_pareto_b: float = 12.0
    folds: int = 0  # 0: the source's own test set; k >= 2: test fold `fold` of k (`comic.data.folds`)
    fold: int = 0

    @classmethod
    def from_config(cls, data: DataConfig, **extra: Any) -> BuildParams:
        return cls(longtail=data.longtail, max_count=data.max_count, min_count=data.min_count,
                   pareto_b=data.pareto_b, missing_rate=data.missing_rate, split_seed=data.split_seed,
                   val_size=data.val_size, skip_bad_images=data.skip_bad_images, folds=data.folds, fold=data.fold,
                   **extra)

    def hashed(self) -> dict[str, Any]:
        """The parameters that identify a build; the fold keys only when folds are on, so that a build without
        folds keeps the identity it had before folds existed."""
        params = asdict(self)
        if not self.folds:
            del params["folds"], params["fold"]
        return params

    def check(self) -> None:
        """Raise BenchmarkError naming the flag and config key of the first bad value."""
        if self.longtail not in ("pareto", "none"):
            raise BenchmarkError(f"longtail {self.longtail!r} (--longtail / data.longtail): must be pareto or none")
        if not 0.0 <= self.missing_rate < 1.0:
            raise BenchmarkError(f"missing rate {self.missing_rate} (--missing-rate / data.missing_rate): "
                                 "must be in [0, 1)")
        if self.min_count < 1:
            raise BenchmarkError(f"min count {self.min_count} (--min-count / data.min_count): must be >= 1")
        if self.max_count < self.min_count:
            raise BenchmarkError(f"max count {self.max_count} (--max-count / data.max_count) is smaller than min "
                                 f"count {self.min_count} (--min-count / data.min_count)")
        if not self.pareto_b > 0:
            raise BenchmarkError(f"Pareto shape {self.pareto_b} (--pareto-b / data.pareto_b): must be > 0")
        if self.val_size < 0 or self.split_seed < 0:
            raise BenchmarkError("--val-size / data.val_size and --split-seed / data.split_seed must be >= 0")
        if self.folds == 1 or self.folds < 0 or not 0 <= self.fold < max(self.folds, 1):
            raise BenchmarkError(f"folds {self.folds}, fold {self.fold} (--folds / data.folds, --fold / data.fold): "
                                 "folds is 0 (the source's own test set) or k >= 2, and fold is in 0 .. k-1")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise BenchmarkError(f"{path}: not found (check the source folder and the image set name)")
    return path.read_text()


