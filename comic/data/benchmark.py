"""PLT benchmark builder and reader: source labels -> train / val / test splits -> Parquet manifest + dataset card.

A build reads the full labels of a source train pool and a source test set, selects the training images (Pareto
long-tail subsample, or all of them), drops positives of the training images (missing-label protocol), draws a
validation split from pool images *not* selected for training (full labels, observed = full) and keeps the source
test set whole (full labels). DESIGN §4 gives the rules; `longtail.py` and `partial.py` implement them.

Output: `<out>/<kind>-<hash>/` where the hash covers the builder parameters and a checksum of the source
annotation files, holding
    manifest.parquet          image_id (string), file (relative to the split's image root), split,
                              full and observed (fixed-size lists of C uint8)
    card.json                 class names, sizes, full / observed counts per split, shot groups, parameters, hashes
    card.md                   a short human summary
    class_distribution.png    full vs observed train counts, sorted, many / medium / few bands
A build is written into a hidden temporary sibling and renamed at the end: a directory with the final name is
always complete, and rebuilding with the same inputs finds it and does no work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from comic.data.labels import LabelError, LabelSet, coco_labels, read_label_csv, voc_test_labels, voc_train_labels

if TYPE_CHECKING:
    from comic.config import DataConfig

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
SHOT_MANY, SHOT_FEW = 100, 20  # many >= 100 observed train images, few < 20, medium in between (DESIGN §4)
MANIFEST, CARD_JSON, CARD_MD, CHART = "manifest.parquet", "card.json", "card.md", "class_distribution.png"
KINDS = ("plt-voc", "plt-coco", "coco-format", "synthetic")


class BenchmarkError(ValueError):
    """A benchmark cannot be built or read; the message names the file, flag or config key at fault."""


# ----------------------------------------------------------------------------------------------- sources ----

@dataclass(frozen=True)
class LabelSource:
    """One source split: how to read its labels and where its images are.

    reader: 'coco' (instances JSON), 'voc-train' (XML rule), 'voc-test' (ImageSets flags) or 'csv';
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
        if self.reader == "csv":
            return read_label_csv(self.path)
        raise BenchmarkError(f"unknown label reader {self.reader!r}")

    def annotation_files(self) -> list[Path]:
        """The files whose content determines the labels (checksummed into the benchmark hash)."""
        if self.reader in ("coco", "csv"):
            return [self.path]
        main = self.path / "ImageSets" / "Main"
        if self.reader == "voc-test":
            from comic.data.labels import VOC_CLASSES

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
    return Source(kind, LabelSource("coco", _abs(train_json), _abs(train_images)),
                  LabelSource("coco", _abs(test_json), _abs(test_images)))


def coco_root_source(root: str | Path, kind: str = "coco-format") -> Source:
    """The `coco-format` folder convention: annotations/instances_{train,test}.json, train/, test/."""
    root = _abs(root)
    return coco_format_source(root / "annotations" / "instances_train.json", root / "train",
                              root / "annotations" / "instances_test.json", root / "test", kind)


def plt_coco_source(root: str | Path) -> Source:
    """PLT-COCO: COCO 2017 under `root` (annotations/instances_{train,val}2017.json, train2017/, val2017/)."""
    root = _abs(root)
    ann = root / "annotations"
    return coco_format_source(ann / "instances_train2017.json", root / "train2017", ann / "instances_val2017.json",
                              root / "val2017", kind="plt-coco")


def plt_voc_source(voc2012: str | Path, voc2007: str | Path) -> Source:
    """PLT-VOC: VOC2012 trainval (XML labels) as the pool, VOC2007 test (ImageSets flags) as the test set."""
    voc2012, voc2007 = _abs(voc2012), _abs(voc2007)
    return Source("plt-voc", LabelSource("voc-train", voc2012, voc2012, "trainval"),
                  LabelSource("voc-test", voc2007, voc2007, "test"))


def source_from_config(data: DataConfig) -> Source:
    """The source `data` describes; for `synthetic` with an empty root, the generated source (made if missing)."""
    root = data.root
    if data.benchmark == "synthetic" and not root:
        from comic.data.synthetic import ensure_source

        root = str(ensure_source(data.cache_dir, data.synthetic_images, data.synthetic_test_images,
                                 data.synthetic_classes, data.split_seed))
    if not root:
        raise BenchmarkError(f"data.root is empty: benchmark '{data.benchmark}' needs its source folder "
                             f"({_ROOT_HELP[data.benchmark]}) or a built benchmark directory")
    if data.benchmark == "plt-voc":
        return plt_voc_source(Path(root) / "VOC2012", Path(root) / "VOC2007")
    if data.benchmark == "plt-coco":
        return plt_coco_source(root)
    return coco_root_source(root, kind=data.benchmark)


_ROOT_HELP = {
    "plt-voc": "a VOCdevkit folder holding VOC2012/ and VOC2007/",
    "plt-coco": "a COCO folder holding annotations/instances_{train,val}2017.json, train2017/, val2017/",
    "coco-format": "a folder holding annotations/instances_{train,test}.json, train/, test/",
    "synthetic": "empty: the source is generated",
}


# -------------------------------------------------------------------------------------------- parameters ----

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

    @classmethod
    def from_config(cls, data: DataConfig, **extra: Any) -> BuildParams:
        return cls(longtail=data.longtail, max_count=data.max_count, min_count=data.min_count,
                   pareto_b=data.pareto_b, missing_rate=data.missing_rate, split_seed=data.split_seed,
                   val_size=data.val_size, skip_bad_images=data.skip_bad_images, **extra)

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


# ----------------------------------------------------------------------------------------------- reading ----

@dataclass(frozen=True, eq=False)
class Split:
    """One split. observed / full: [N, C] uint8 (full == observed where the source is genuinely partial)."""

    image_ids: list
    paths: list[Path]
    observed: np.ndarray
    full: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True, eq=False)
class Benchmark:
    """A built benchmark: its directory, dataset card, class names and the three splits."""

    root: Path
    card: dict
    class_names: list[str]
    train: Split
    val: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_counts(self) -> np.ndarray:
        """[C] int64 observed positive counts of the train split (shot groups come from these; may hold 0)."""
        return self.train.observed.sum(axis=0).astype(np.int64)

    @property
    def has_full_labels(self) -> bool:
        """True when the builder dropped labels itself, so `full` holds the labels before dropping."""
        return float(self.card["parameters"]["missing_rate"]) > 0

    @property
    def shot_groups(self) -> dict[str, list[int]]:
        """Class indices of the many / medium / few groups (from observed train counts)."""
        return {k: list(v) for k, v in self.card["shot_groups"].items()}

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def load_benchmark(path: str | Path) -> Benchmark:
    """Read a built benchmark directory (one holding card.json and manifest.parquet)."""
    import pyarrow.parquet as pq

    root = _abs(path)
    if not (root / CARD_JSON).is_file():
        raise BenchmarkError(f"{root}: not a built benchmark (no {CARD_JSON}); build one with "
                             "`python -m comic.data build ...`")
    card = json.loads((root / CARD_JSON).read_text())
    table = pq.read_table(root / MANIFEST)
    names = card["class_names"]
    split_col = np.asarray(table.column("split").to_pylist())
    ids = table.column("image_id").to_pylist()
    if card.get("image_id_type") == "int":
        ids = [int(i) for i in ids]
    files = table.column("file").to_pylist()
    full, observed = (_label_column(table, key, len(names)) for key in ("full", "observed"))
    roots = {k: Path(v) for k, v in card["image_roots"].items()}
    splits = {}
    for name in ("train", "val", "test"):
        rows = np.flatnonzero(split_col == name)
        image_root = roots["test" if name == "test" else "pool"]
        splits[name] = Split([ids[i] for i in rows], [image_root / files[i] for i in rows], observed[rows],
                             full[rows])
    return Benchmark(root=root, card=card, class_names=list(names), **splits)


def _label_column(table: Any, key: str, num_classes: int) -> np.ndarray:
    column = table.column(key).combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.uint8).reshape(-1, num_classes)


# -------------------------------------------------------------------------------------------- top level ----

def ensure_benchmark(data: DataConfig) -> Path:
    """Build (or find, doing no work) the benchmark `data` describes; returns its absolute directory.

    `data.root` naming a built benchmark directory (it holds card.json) is returned as is. Otherwise the source
    is read from `data.root` (synthetic: generated under `data.cache_dir`) and the benchmark is built under
    `data.cache_dir`.
    """
    if data.root and (Path(data.root) / CARD_JSON).is_file():
        return _abs(data.root)
    return build_benchmark(source_from_config(data), BuildParams.from_config(data), data.cache_dir)


def build_benchmark(source: Source, params: BuildParams, out: str | Path) -> Path:
    """Build the benchmark of `source` with `params` under `out` unless it exists; returns its directory."""
    params.check()
    out = _abs(out)
    key = benchmark_key(source, params)
    final = out / f"{source.kind}-{key[:12]}"
    if (final / CARD_JSON).is_file():
        log.info("benchmark %s already built; reusing it (no work)", final)
        return final
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, final.name)
    content = _assemble(source, params)
    parts = _key_parts(source, params)  # cheap now: file digests are remembered
    content.card.update(name=final.name, hash=key, source_sha256={k: parts[k]["sha256"] for k in ("pool", "test")})
    tmp = make_temp_dir(out, final.name)
    try:
        write_benchmark(tmp, content)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("benchmark built: %s", final)
    return final


def benchmark_key(source: Source, params: BuildParams) -> str:
    """sha256 over the builder version, kind, parameters, source locations and source annotation checksums."""
    return hashlib.sha256(json.dumps(_key_parts(source, params), sort_keys=True).encode()).hexdigest()


def _key_parts(source: Source, params: BuildParams) -> dict[str, Any]:
    parts: dict[str, Any] = {"builder": BUILDER_VERSION, "kind": source.kind, "params": asdict(params)}
    for name, split_source in (("pool", source.pool), ("test", source.test)):
        parts[name] = {**split_source.describe(), "sha256": checksum(split_source.annotation_files())}
    if params.rng_after_voc:
        parts["rng_after_voc"] = checksum(_voc_prefix_source(params.rng_after_voc).annotation_files())
    return parts


def checksum(files: Sequence[Path]) -> str:
    """sha256 over the names and contents of `files`; a missing file is an error naming it."""
    digest = hashlib.sha256()
    for path in files:
        if not path.is_file():
            raise BenchmarkError(f"{path}: source annotation file not found")
        digest.update(path.name.encode() + b"\0" + _file_digest(path).encode())
    return digest.hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so repeated ensure_benchmark calls in one process
    (a trainer checks its benchmark more than once) hash COCO's 450 MB train JSON only once."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished build into place; losing a race to a concurrent identical build is fine."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / CARD_JSON).is_file():
            raise
        log.info("a concurrent build produced %s first; using it", final)


def remove_stale_temps(parent: Path, name: str) -> None:
    """Delete `.{name}.tmp-<pid>-*` leftovers of interrupted builds whose process is gone."""
    for path in parent.glob(f".{name}.tmp-*"):
        match = re.match(rf"\.{re.escape(name)}\.tmp-(\d+)-", path.name)
        if match and not _pid_alive(int(match.group(1))):
            log.info("removing %s, left by an interrupted build", path)
            shutil.rmtree(path, ignore_errors=True)


def make_temp_dir(parent: Path, name: str) -> Path:
    """A fresh `.{name}.tmp-<pid>-*` folder in `parent` (the pid lets later runs spot leftovers of dead builds)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the published directory should be readable as usual
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------- selection ----

@dataclass
class _Content:
    """What a build writes: per-split rows of the source label sets, observed train labels, card."""

    pool: LabelSet
    test: LabelSet
    rows: dict[str, list[int]]
    observed_train: np.ndarray
    card: dict = field(default_factory=dict)


def _assemble(source: Source, params: BuildParams) -> _Content:
    log.info("reading labels: pool %s, test %s", source.pool.path, source.test.path)
    pool, test = source.pool.read(), source.test.read()
    _check_sources(source, pool, test)
    skipped: list[dict] = []
    train_rows, val_rows = _select_train_val(pool, source.pool.image_root, params, skipped)
    test_rows = _check_rows(test, source.test.image_root, list(range(test.num_images)), "test", params, skipped)
    if not train_rows:
        raise BenchmarkError(f"{source.pool.path}: the training selection is empty (no usable images)")
    from comic.data.partial import drop_positives

    observed = drop_positives(pool.labels[train_rows], params.missing_rate, params.split_seed)
    content = _Content(pool, test, {"train": train_rows, "val": val_rows, "test": test_rows}, observed)
    content.card = make_card(source, params, content, skipped)
    return content


def _check_sources(source: Source, pool: LabelSet, test: LabelSet) -> None:
    for split_source, labels in ((source.pool, pool), (source.test, test)):
        if labels.num_images == 0 or labels.num_classes == 0:
            raise BenchmarkError(f"{split_source.path}: empty source ({labels.num_images} images, "
                                 f"{labels.num_classes} classes)")
    if not pool.labels.any():
        raise BenchmarkError(f"{source.pool.path}: empty source: no image has a positive label")
    if pool.class_names != test.class_names:
        raise BenchmarkError(f"{source.test.path}: its classes differ from those of {source.pool.path} "
                             f"({len(test.class_names)} vs {len(pool.class_names)} classes, or another order)")


def _select_train_val(pool: LabelSet, image_root: Path, params: BuildParams,
                      skipped: list[dict]) -> tuple[list[int], list[int]]:
    """Train and val rows of the pool (sorted), images checked."""
    if params.longtail == "pareto":
        train_rows = _check_rows(pool, image_root, _select_train(pool, params), "train", params, skipped)
        return train_rows, _select_val(pool, image_root, train_rows, params, skipped)
    # longtail none: everything trains except the validation images, which are drawn first.
    val_rows = _select_val(pool, image_root, [], params, skipped)
    bad = {record["file"] for record in skipped}
    rest = [r for r in sorted(set(range(pool.num_images)) - set(val_rows))
            if str(image_root / pool.file_names[r]) not in bad]
    return _check_rows(pool, image_root, rest, "train", params, skipped), val_rows


def _select_train(pool: LabelSet, params: BuildParams) -> list[int]:
    """Pool rows of the Pareto long-tail subsample, in source order."""
    from comic.data.longtail import pareto_subsample

    rng = random.Random(params.split_seed)
    if params.rng_after_voc:
        voc = _voc_prefix_source(params.rng_after_voc).read()
        log.info("advancing the Pareto RNG with a VOC build (max %d, b %g) first", params.voc_max_count,
                 params.voc_pareto_b)
        pareto_subsample(voc.labels, params.voc_max_count, params.voc_pareto_b, rng=rng)
    rows = pareto_subsample(pool.labels, params.max_count, params.pareto_b, min_count=params.min_count, rng=rng)
    return sorted(rows)


def _voc_prefix_source(path: str) -> LabelSource:
    p = _abs(path)
    return LabelSource("voc-train" if p.is_dir() else "csv", p, p, "trainval")


def _select_val(pool: LabelSet, image_root: Path, train_rows: list[int], params: BuildParams,
                skipped: list[dict]) -> list[int]:
    """`val_size` random pool rows not used for training (bad images replaced by the next candidates)."""
    taken = set(train_rows)
    left = [r for r in range(pool.num_images) if r not in taken]
    if params.val_size > len(left):
        raise BenchmarkError(
            f"validation size {params.val_size} (--val-size / data.val_size) is larger than the {len(left)} pool "
            f"images available for it ({pool.num_images} in the pool of {pool.source}, {len(train_rows)} selected "
            "for training)")
    order = np.random.default_rng([params.split_seed, 1]).permutation(len(left))
    candidates = [left[i] for i in order]
    chosen: list[int] = []
    while len(chosen) < params.val_size and candidates:
        batch, candidates = candidates[:params.val_size - len(chosen)], candidates[params.val_size - len(chosen):]
        chosen += _check_rows(pool, image_root, batch, "val", params, skipped)
    if len(chosen) < params.val_size:
        raise BenchmarkError(f"validation size {params.val_size} (--val-size / data.val_size): only {len(chosen)} "
                             "readable pool images are left for validation")
    return sorted(chosen)


def _check_rows(labels: LabelSet, image_root: Path, rows: list[int], split: str, params: BuildParams,
                skipped: list[dict]) -> list[int]:
    """Decode-check the images of `rows`; bad ones raise, or with skip_bad_images are dropped and recorded."""
    paths = [image_root / labels.file_names[r] for r in rows]
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        problems = list(tqdm(pool.map(image_problem, paths), total=len(paths), desc=f"checking {split} images",
                             unit="img", disable=None, leave=False))
    good = []
    for row, path, problem in zip(rows, paths, problems, strict=True):
        if problem is None:
            good.append(row)
        elif params.skip_bad_images:
            log.warning("skipping %s image %s: %s", split, path, problem)
            skipped.append({"split": split, "file": str(path), "reason": problem})
        else:
            raise BenchmarkError(f"{path}: {problem} ({split} image {labels.image_ids[row]!r} of {labels.source}); "
                                 "fix the file or pass --skip-bad-images / data.skip_bad_images=true to skip "
                                 "(and count) such images")
    return good


def image_problem(path: Path) -> str | None:
    """None if `path` decodes as an image, else why not ('missing image file', 'corrupt image: ...')."""
    try:
        with Image.open(path) as image:
            # Decoding at a reduced DCT scale still reads all of the data (truncation is caught) at a fraction of
            # the cost of a full decode.
            image.draft("RGB", (64, 64))
            image.load()
    except FileNotFoundError:
        return "missing image file"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"corrupt image ({err})"
    return None


# ------------------------------------------------------------------------------------------------ output ----

def shot_groups(counts: np.ndarray) -> dict[str, list[int]]:
    """Class indices per shot group from observed train counts [C]: many >= 100, medium 20-99, few < 20."""
    counts = np.asarray(counts)
    return {"many": np.flatnonzero(counts >= SHOT_MANY).tolist(),
            "medium": np.flatnonzero((counts >= SHOT_FEW) & (counts < SHOT_MANY)).tolist(),
            "few": np.flatnonzero(counts < SHOT_FEW).tolist()}


def make_card(source: Source, params: BuildParams, content: _Content, skipped: list[dict]) -> dict:
    """The dataset card (card.json) of a build."""
    labels = _split_labels(content)
    counts = {name: {"full": full.sum(0).astype(int).tolist(), "observed": obs.sum(0).astype(int).tolist()}
              for name, (full, obs) in labels.items()}
    train_full, train_obs = labels["train"]
    ids = content.pool.image_ids + content.test.image_ids
    return {
        "format_version": 1, "builder_version": BUILDER_VERSION, "benchmark": source.kind,
        "parameters": asdict(params),
        "sources": {"pool": source.pool.describe(), "test": source.test.describe()},
        "image_roots": {"pool": str(source.pool.image_root), "test": str(source.test.image_root)},
        "image_id_type": "int" if all(isinstance(i, int) for i in ids) else "str",
        "class_names": list(content.pool.class_names),
        "sizes": {"pool": content.pool.num_images, "source_test": content.test.num_images,
                  **{name: len(rows) for name, rows in content.rows.items()}},
        "counts": counts,
        "labels": {"train_full": int(train_full.sum()), "train_observed": int(train_obs.sum()),
                   "train_retention": round(float(train_obs.sum() / max(train_full.sum(), 1)), 4)},
        "shot_thresholds": {"many": SHOT_MANY, "few": SHOT_FEW},
        "shot_groups": shot_groups(train_obs.sum(0)),
        "skipped_images": skipped, "skipped_count": len(skipped),
        "files": {"manifest": MANIFEST, "summary": CARD_MD, "chart": CHART},
    }


def _split_labels(content: _Content) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(full, observed) [N, C] per split; val and test are fully observed."""
    train_full = content.pool.labels[content.rows["train"]]
    val = content.pool.labels[content.rows["val"]]
    test = content.test.labels[content.rows["test"]]
    return {"train": (train_full, content.observed_train), "val": (val, val), "test": (test, test)}


def write_benchmark(folder: Path, content: _Content) -> None:
    """Write manifest, chart, summary and (last) card.json into `folder`."""
    write_manifest(folder / MANIFEST, content)
    write_chart(folder / CHART, content.card)
    (folder / CARD_MD).write_text(card_summary(content.card))
    (folder / CARD_JSON).write_text(json.dumps(content.card, indent=1) + "\n")


def write_manifest(path: Path, content: _Content) -> None:
    """manifest.parquet: image_id, file, split, full / observed as fixed-size lists of C uint8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, files, splits, fulls, observed = [], [], [], [], []
    for name, (full, obs) in _split_labels(content).items():
        labels = content.test if name == "test" else content.pool
        rows = content.rows[name]
        ids += [str(labels.image_ids[r]) for r in rows]
        files += [labels.file_names[r] for r in rows]
        splits += [name] * len(rows)
        fulls.append(full)
        observed.append(obs)
    num_classes = content.pool.num_classes
    table = pa.table({
        "image_id": pa.array(ids, pa.string()), "file": pa.array(files, pa.string()),
        "split": pa.array(splits, pa.string()).dictionary_encode(),
        "full": _fixed_list(np.concatenate(fulls), num_classes),
        "observed": _fixed_list(np.concatenate(observed), num_classes),
    })
    pq.write_table(table, path)


def _fixed_list(labels: np.ndarray, num_classes: int) -> Any:
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(labels, dtype=np.uint8).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, num_classes)


def card_summary(card: dict) -> str:
    """card.md: sizes, parameters, label retention, shot groups and a per-class table."""
    p, sizes, counts, names = card["parameters"], card["sizes"], card["counts"], card["class_names"]
    groups = card["shot_groups"]
    longtail = (f"Pareto (max {p['max_count']}, min {p['min_count']}, b {p['pareto_b']:g})"
                if p["longtail"] == "pareto" else "none (source distribution kept)")
    lines = [f"# {card['name']}", "",
             f"Benchmark `{card['benchmark']}` from {card['sources']['pool']['path']} (pool of {sizes['pool']:,} "
             f"images) and {card['sources']['test']['path']} (test).", "",
             f"Long tail: {longtail}; missing rate {p['missing_rate']:g}; split seed {p['split_seed']}; "
             f"validation size {p['val_size']}.", "",
             "| split | images | full labels | observed labels |", "|---|---:|---:|---:|"]
    for split in ("train", "val", "test"):
        lines.append(f"| {split} | {sizes[split]:,} | {sum(counts[split]['full']):,} | "
                     f"{sum(counts[split]['observed']):,} |")
    obs = counts["train"]["observed"]
    lines += ["", f"Train label retention {card['labels']['train_retention']:.1%}; observed train counts: max "
              f"{max(obs)} ({names[int(np.argmax(obs))]}), min {min(obs)} ({names[int(np.argmin(obs))]}).",
              f"Shot groups (observed train counts; many >= {SHOT_MANY}, few < {SHOT_FEW}): many "
              f"{len(groups['many'])}, medium {len(groups['medium'])}, few {len(groups['few'])}.",
              f"Skipped images: {card['skipped_count']}.", "", "| class | train full | train observed | group |",
              "|---|---:|---:|---|"]
    group_of = {c: g for g, members in groups.items() for c in members}
    for c in np.argsort(-np.asarray(obs), kind="stable"):
        lines.append(f"| {names[c]} | {counts['train']['full'][c]} | {obs[c]} | {group_of[int(c)]} |")
    lines += ["", f"Hash `{card['hash']}`; chart `{CHART}`; manifest `{MANIFEST}`.", ""]
    return "\n".join(lines)


def write_chart(path: Path, card: dict) -> None:
    """PNG of full vs observed train counts per class, sorted by observed count, shot-group bands shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    full = np.asarray(card["counts"]["train"]["full"])
    obs = np.asarray(card["counts"]["train"]["observed"])
    order = np.argsort(-obs, kind="stable")
    names = [card["class_names"][i] for i in order]
    x = np.arange(len(order))
    fig = Figure(figsize=(max(6.0, 0.16 * len(order) + 2), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = max(float(full.max()), SHOT_MANY) * 1.6
    for lo, hi, colour, label in ((SHOT_MANY, top, "#2a9d8f", "many"), (SHOT_FEW, SHOT_MANY, "#e9c46a", "medium"),
                                  (0.8, SHOT_FEW, "#e76f51", "few")):
        ax.axhspan(lo, hi, color=colour, alpha=0.12, lw=0)
        ax.text(len(order) - 0.5, (lo * hi) ** 0.5, label, ha="right", va="center", fontsize=8, color=colour)
    ax.bar(x, np.maximum(full[order], 0.8), width=0.8, color="#adb5bd", label="full")
    ax.bar(x, np.maximum(obs[order], 0.8), width=0.5, color="#264653", label="observed")
    ax.set_yscale("log")
    ax.set_ylim(0.8, top)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_xticks(x, names, rotation=90, fontsize=max(4, min(8, 400 // max(len(order), 1))))
    ax.set_ylabel("train images with the class")
    ax.set_title(f"{card['name']}: train class distribution (sorted by observed count)", fontsize=9)
    ax.legend(loc="upper center", fontsize=8, frameon=False, ncols=2)
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------- helpers ----

def _abs(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise BenchmarkError(f"{path}: not found (check the source folder and the image set name)")
    return path.read_text()


__all__ = ["Benchmark", "BenchmarkError", "BuildParams", "LabelError", "LabelSource", "Source", "Split",
           "build_benchmark", "coco_format_source", "coco_root_source", "ensure_benchmark", "load_benchmark",
           "plt_coco_source", "plt_voc_source", "shot_groups", "source_from_config"]

