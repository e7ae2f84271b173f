"""Full label matrices from source annotations: COCO instances JSON, PASCAL VOC XML / ImageSets, label CSVs.

Owns the benchmarks' labelling rules and the input checks in front of them:
- COCO: a class is positive iff the image has an annotation of it with area > 0 and bbox w >= 1 and h >= 1;
  rows in `COCO.getImgIds()` order, classes in category-id order (ids may be non-contiguous).
- VOC train: positive iff the image's XML has any <object> of the class (difficult included).
- VOC test: positive iff the flag in `ImageSets/Main/<cls>_<set>.txt` is 1 (0 = difficult-only and -1 are negative).
Bad input raises `LabelError` naming the file, the entry and how to fix it. VOC `file_names` are relative to the
VOC root folder (`JPEGImages/<id>.jpg`); COCO `file_names` are the JSON's `file_name`, relative to the image folder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from comic._io import UserError

log = logging.getLogger(__name__)

__all__ = [
    "VOC_CLASSES",
    "LabelError",
    "LabelSet",
    "coco_labels",
    "read_label_csv",
    "voc_flag_labels",
    "voc_test_labels",
    "voc_train_labels",
]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class LabelError(UserError, ValueError):
    """Source annotations that cannot be turned into labels; the message names the file and the entry."""


@dataclass(frozen=True, eq=False)
class LabelSet:
    """Full 0/1 labels of a source split. labels: [N, C] uint8, row i belongs to image_ids[i] / file_names[i].

    `category_ids` holds the COCO category id of each column (None for VOC and CSV sources); `source` is the
    annotation file or folder the labels came from.
    """

    image_ids: list
    file_names: list[str]
    class_names: list[str]
    labels: np.ndarray
    category_ids: list[int] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        n, c = len(self.image_ids), len(self.class_names)
        if self.labels.shape != (n, c) or len(self.file_names) != n:
            raise ValueError(
                f"LabelSet: labels shape {self.labels.shape}, {len(self.file_names)} file names, "
                f"{n} image ids and {c} classes do not agree"
            )

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, rows: Sequence[int]) -> LabelSet:
        """The rows `rows` (in the given order) as a new LabelSet with the same classes."""
        idx = [int(r) for r in rows]
        return LabelSet(
            image_ids=[self.image_ids[i] for i in idx],
            file_names=[self.file_names[i] for i in idx],
            class_names=list(self.class_names),
            labels=self.labels[idx],
            category_ids=None if self.category_ids is None else list(self.category_ids),
            source=self.source,
        )


# ----------------------------------------------------------------------------------------------------------- COCO


def coco_labels(ann_file: str | Path) -> LabelSet:
    """Labels of a COCO-format instances JSON (the rule above); raises LabelError on bad input."""
    path = Path(ann_file)
    data = _read_json(path)
    _check_coco_structure(data, path)
    coco = _coco_index(data, path)
    img_ids = list(coco.getImgIds())
    cat_ids = sorted(coco.getCatIds())
    row_of = {img_id: r for r, img_id in enumerate(img_ids)}
    col_of = {cat_id: c for c, cat_id in enumerate(cat_ids)}
    labels = np.zeros((len(img_ids), len(cat_ids)), dtype=np.uint8)
    for ann in coco.anns.values():
        if _counts_as_positive(ann):
            labels[row_of[ann["image_id"]], col_of[ann["category_id"]]] = 1
    images = coco.loadImgs(img_ids)
    cats = coco.loadCats(cat_ids)
    log.info("%s: %d images, %d classes, %d positive labels", path, len(img_ids), len(cat_ids), int(labels.sum()))
    return LabelSet(
        image_ids=img_ids,
        file_names=[img["file_name"] for img in images],
        class_names=[str(cat["name"]) for cat in cats],
        labels=labels,
        category_ids=cat_ids,
        source=str(path),
    )


def _counts_as_positive(ann: dict) -> bool:
    # Degenerate boxes (zero area, sub-pixel width or height) are annotation noise, not evidence of the class.
    _, _, w, h = ann["bbox"]
    return ann["area"] > 0 and w >= 1 and h >= 1


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise LabelError(f"{path}: annotation file not found (pass the path of a COCO-format instances JSON)")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise LabelError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise LabelError(f"{path}: not a UTF-8 JSON file ({e})") from e
    if not isinstance(data, dict):
        raise LabelError(f"{path}: top level must be a JSON object with 'images', 'annotations', 'categories'")
    return data


def _check_coco_structure(data: dict, path: Path) -> None:
    """Validate what pycocotools would otherwise reject with a KeyError or silently accept."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise LabelError(f"{path}: field '{key}' is missing or not a list (a COCO instances JSON needs it)")
    if not data["images"]:
        raise LabelError(f"{path}: 'images' is empty; the source has no images to label")
    img_ids = _unique_ids(data["images"], "images", ("id", "file_name"), path)
    cat_ids = _unique_ids(data["categories"], "categories", ("id", "name"), path)
    for i, ann in enumerate(data["annotations"]):
        _check_annotation(ann, i, img_ids, cat_ids, path)


def _unique_ids(entries: list, field: str, required: tuple[str, ...], path: Path) -> set:
    ids: set = set()
    for i, entry in enumerate(entries):
        missing = [k for k in required if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise LabelError(f"{path}: {field}[{i}] lacks {', '.join(repr(k) for k in missing)}")
        if entry["id"] in ids:
            raise LabelError(f"{path}: {field}[{i}] repeats id {entry['id']!r}; ids must be unique")
        ids.add(entry["id"])
    return ids


def _check_annotation(ann: object, i: int, img_ids: set, cat_ids: set, path: Path) -> None:
    required = ("id", "image_id", "category_id", "bbox", "area")
    missing = [k for k in required if not isinstance(ann, dict) or k not in ann]
    if missing:
        raise LabelError(f"{path}: annotations[{i}] lacks {', '.join(repr(k) for k in missing)}")
    where = f"{path}: annotation id {ann['id']!r} (annotations[{i}])"
    if ann["category_id"] not in cat_ids:
        raise LabelError(
            f"{where} has category_id {ann['category_id']!r}, which is not in 'categories' "
            f"(known ids: {sorted(cat_ids)}); fix the annotation or add the category"
        )
    if ann["image_id"] not in img_ids:
        raise LabelError(f"{where} has image_id {ann['image_id']!r}, which is not in 'images'")
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise LabelError(f"{where} has bbox {bbox!r}; expected [x, y, w, h] numbers")
    if not isinstance(ann["area"], (int, float)):
        raise LabelError(f"{where} has area {ann['area']!r}; expected a number")


def _coco_index(data: dict, path: Path):
    """A pycocotools COCO index over already-parsed data (parsing twice would double the cost on train2017)."""
    coco = COCO()
    coco.dataset = data
    # pycocotools reports progress with print(); keep stdout clean and route it to the log instead.
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        coco.createIndex()
    log.debug("pycocotools (%s): %s", path, chatter.getvalue().strip())
    return coco


# ------------------------------------------------------------------------------------------------------------ VOC


def voc_train_labels(voc_root: str | Path, image_set: str = "trainval") -> LabelSet:
    """VOC labels from XML (train rule: any <object> of the class, difficult included).

    Images are those of `<voc_root>/ImageSets/Main/<image_set>.txt`, in that order; labels: [N, 20].
    """
    root = Path(voc_root)
    ids = _read_id_list(root / "ImageSets" / "Main" / f"{image_set}.txt")
    ann_dir = _require_dir(root / "Annotations", "the VOC XML annotations")
    col_of = {name: c for c, name in enumerate(VOC_CLASSES)}
    labels = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.uint8)
    for r, image_id in enumerate(ids):
        for name in _voc_object_names(ann_dir / f"{image_id}.xml"):
            labels[r, col_of[name]] = 1
    log.info("%s (%s): %d images, %d positive labels", root, image_set, len(ids), int(labels.sum()))
    return _voc_label_set(root, ids, labels)


def voc_test_labels(voc_root: str | Path, image_set: str = "test") -> LabelSet:
    """VOC labels from `ImageSets/Main/<cls>_<image_set>.txt` flags, the test rule: positive iff flag == 1."""
    return voc_flag_labels(voc_root, image_set, difficult_positive=False)


def voc_flag_labels(voc_root: str | Path, image_set: str, difficult_positive: bool) -> LabelSet:
    """VOC labels from the `ImageSets/Main/<cls>_<image_set>.txt` flags (1 positive, 0 difficult, -1 negative).

    `difficult_positive`: a difficult-only class counts as positive (the train rule, as the XML rule includes
    difficult objects) or as negative (the test rule). Rows follow the order of the first class file; every class
    file must list the same images. labels: [N, 20].
    """
    root = Path(voc_root)
    main = root / "ImageSets" / "Main"
    flags = [_read_flag_file(main / f"{cls}_{image_set}.txt") for cls in VOC_CLASSES]
    ids = list(flags[0])
    labels = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.uint8)
    for c, (cls, per_image) in enumerate(zip(VOC_CLASSES, flags, strict=True)):
        if per_image.keys() != flags[0].keys():
            odd = sorted(set(per_image).symmetric_difference(flags[0]))[:5]
            raise LabelError(
                f"{main / f'{cls}_{image_set}.txt'}: lists different images than "
                f"{main / f'{VOC_CLASSES[0]}_{image_set}.txt'} (e.g. {odd}); all class files must list the same images"
            )
        labels[:, c] = [per_image[i] == 1 or (difficult_positive and per_image[i] == 0) for i in ids]
    log.info("%s (%s): %d images, %d positive labels", root, image_set, len(ids), int(labels.sum()))
    return _voc_label_set(root, ids, labels)


def _voc_label_set(root: Path, ids: list[str], labels: np.ndarray) -> LabelSet:
    return LabelSet(
        image_ids=ids,
        file_names=[f"JPEGImages/{i}.jpg" for i in ids],
        class_names=list(VOC_CLASSES),
        labels=labels,
        source=str(root),
    )


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise LabelError(f"{path}: folder not found ({what}); pass the VOC20xx folder as the VOC root")
    return path


def _read_id_list(path: Path) -> list[str]:
    _require_dir(path.parent, "the VOC ImageSets/Main lists")
    if not path.is_file():
        raise LabelError(f"{path}: image list not found; check the image_set name and the VOC root folder")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise LabelError(f"{path}: the image list is empty; the source has no images to label")
    return ids


def _voc_object_names(xml_path: Path) -> list[str]:
    if not xml_path.is_file():
        raise LabelError(f"{xml_path}: annotation XML not found for an image listed in ImageSets")
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as e:
        raise LabelError(f"{xml_path}: unparsable XML ({e})") from e
    names = []
    for k, obj in enumerate(tree.getroot().iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise LabelError(
                f"{xml_path}: <object> #{k} has class name {name!r}, not one of the 20 VOC classes {list(VOC_CLASSES)}"
            )
        names.append(name)
    return names


def _read_flag_file(path: Path) -> dict[str, int]:
    """{image id: flag} of one `<cls>_<set>.txt` file, in file order; flags are -1, 0 or 1."""
    if not path.is_file():
        raise LabelError(f"{path}: per-class image list not found; check the image_set name and the VOC root")
    flags: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("-1", "0", "1"):
            raise LabelError(f"{path}, line {lineno}: expected '<image id> <flag>' with flag -1, 0 or 1, got {line!r}")
        if parts[0] in flags:
            raise LabelError(f"{path}, line {lineno}: image {parts[0]!r} is listed twice")
        flags[parts[0]] = int(parts[1])
    if not flags:
        raise LabelError(f"{path}: the image list is empty; the source has no images to label")
    return flags


# ------------------------------------------------------------------------------------------------------------ CSV


def read_label_csv(path: str | Path, file_name_pattern: str = "JPEGImages/{image_id}.jpg") -> LabelSet:
    """Labels from a CSV with header `image_id,<class>,...` and one 0/1 column per class (the shared-data format).

    Rows in file order; image ids stay strings; file_names come from `file_name_pattern` (default: the VOC
    convention, relative to the VOC root). labels: [N, C] uint8.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: label CSV not found")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0] != "image_id" or len(rows[0]) < 2:
        raise LabelError(f"{path}: header must be 'image_id,<class 1>,<class 2>,...'")
    header, body = rows[0], [r for r in rows[1:] if r]
    if not body:
        raise LabelError(f"{path}: no data rows; the source has no images to label")
    labels = np.zeros((len(body), len(header) - 1), dtype=np.uint8)
    for r, row in enumerate(body):
        if len(row) != len(header) or any(v not in ("0", "1") for v in row[1:]):
            raise LabelError(f"{path}, data row {r + 1} ({row[:1]}): expected {len(header) - 1} values, each 0 or 1")
        labels[r] = [int(v) for v in row[1:]]
    ids = [row[0] for row in body]
    return LabelSet(
        image_ids=ids,
        file_names=[file_name_pattern.format(image_id=i) for i in ids],
        class_names=header[1:],
        labels=labels,
        source=str(path),
    )
