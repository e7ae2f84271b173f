"""Label matrices from generated COCO JSON (real pycocotools, real JPEG files) and VOC XML / ImageSets fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comic.data.labels import VOC_CLASSES, LabelError, coco_labels, read_label_csv, voc_test_labels, voc_train_labels

# ----------------------------------------------------------------------------------------------------------- COCO


def _ann(ann_id: int, image_id: int, cat: int, bbox: list[float], area: float | None = None) -> dict:
    area = bbox[2] * bbox[3] if area is None else area
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": area, "iscrowd": 0}


def _coco_dict() -> dict:
    """4 images (ids not sorted), categories 90 / 1 / 5 listed out of id order, degenerate annotations."""
    images = [{"id": i, "file_name": f"img_{i:03d}.jpg", "width": 32, "height": 24} for i in (42, 7, 13, 100)]
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]
    annotations = [
        _ann(1, 42, 1, [0, 0, 10, 10]),  # counts
        _ann(2, 42, 5, [0, 0, 10, 10], area=0),  # area 0: does not count
        _ann(3, 7, 90, [1, 1, 0.5, 10]),  # w < 1: does not count
        _ann(4, 7, 5, [2, 2, 1, 1]),  # w = h = 1: counts
        _ann(5, 13, 1, [0, 0, 10, 0.9]),  # h < 1: does not count
        _ann(6, 13, 90, [0, 0, 3, 4]),  # counts
        _ann(7, 13, 90, [5, 5, 3, 4]),  # second instance of the same class: still one positive
    ]  # image 100 has no annotations
    return {"images": images, "annotations": annotations, "categories": categories}


def _write_coco(tmp_path: Path, data: dict | str) -> Path:
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(data if isinstance(data, str) else json.dumps(data, indent=1))
    return ann_file


def test_coco_label_matrix_matches_hand_built(tmp_path, capsys):
    data = _coco_dict()
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for img in data["images"]:
        Image.new("RGB", (img["width"], img["height"]), (img["id"], 80, 160)).save(image_dir / img["file_name"])
    labels = coco_labels(_write_coco(tmp_path, data))
    assert capsys.readouterr().out == "", "pycocotools chatter must not reach stdout"
    assert labels.image_ids == [42, 7, 13, 100]
    assert labels.category_ids == [1, 5, 90]
    assert labels.class_names == ["person", "airplane", "toothbrush"]
    expected = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=np.uint8)
    assert labels.labels.dtype == np.uint8 and np.array_equal(labels.labels, expected)
    for name in labels.file_names:
        with Image.open(image_dir / name) as im:
            assert im.format == "JPEG"


def test_coco_missing_file(tmp_path):
    with pytest.raises(LabelError, match=r"nope\.json: annotation file not found"):
        coco_labels(tmp_path / "nope.json")


def test_coco_malformed_json_names_file_and_position(tmp_path):
    ann_file = _write_coco(tmp_path, '{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(LabelError, match=r"instances\.json: malformed JSON at line 2, column \d+"):
        coco_labels(ann_file)


@pytest.mark.parametrize("field", ["images", "annotations", "categories"])
def test_coco_missing_field(tmp_path, field):
    data = _coco_dict()
    del data[field]
    with pytest.raises(LabelError, match=rf"instances\.json: field '{field}' is missing"):
        coco_labels(_write_coco(tmp_path, data))


def test_coco_unknown_category_names_annotation_and_category(tmp_path):
    data = _coco_dict()
    data["annotations"].append(_ann(77, 42, 3, [0, 0, 5, 5]))
    with pytest.raises(LabelError, match=r"instances\.json: annotation id 77 .* category_id 3, which is not in"):
        coco_labels(_write_coco(tmp_path, data))


def test_coco_unknown_image_names_annotation_and_image(tmp_path):
    data = _coco_dict()
    data["annotations"].append(_ann(78, 999, 1, [0, 0, 5, 5]))
    with pytest.raises(LabelError, match=r"instances\.json: annotation id 78 .* image_id 999, which is not in"):
        coco_labels(_write_coco(tmp_path, data))


def test_coco_empty_image_list(tmp_path):
    data = {"images": [], "annotations": [], "categories": _coco_dict()["categories"]}
    with pytest.raises(LabelError, match=r"instances\.json: 'images' is empty"):
        coco_labels(_write_coco(tmp_path, data))


# ------------------------------------------------------------------------------------------------------------ VOC

VOC_TRAIN = {  # image id -> [(class, difficult)]
    "2008_000009": [("dog", 0), ("person", 1)],  # the difficult person counts (train rule)
    "2008_000002": [("cat", 0), ("cat", 0), ("sofa", 1)],
    "2008_000005": [("tvmonitor", 0)],
}


def _voc_xml(image_id: str, objects: list[tuple[str, int]]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><difficult>{d}</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
        for name, d in objects
    )
    return f"<annotation><filename>{image_id}.jpg</filename>{objs}</annotation>"


@pytest.fixture
def voc_root(tmp_path) -> Path:
    root = tmp_path / "VOC2012"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / sub).mkdir(parents=True)
    for image_id, objects in VOC_TRAIN.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, objects))
        Image.new("RGB", (16, 12), (10, 20, 30)).save(root / "JPEGImages" / f"{image_id}.jpg")
    (root / "ImageSets/Main/trainval.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    return root


def _row(*names: str) -> list[int]:
    return [int(c in names) for c in VOC_CLASSES]


def test_voc_train_rule(voc_root):
    labels = voc_train_labels(voc_root)
    assert labels.image_ids == list(VOC_TRAIN)  # ImageSets order, not sorted
    assert labels.class_names == list(VOC_CLASSES)
    assert labels.labels.tolist() == [_row("dog", "person"), _row("cat", "sofa"), _row("tvmonitor")]
    assert all((voc_root / f).is_file() for f in labels.file_names)
    assert labels.file_names[0] == "JPEGImages/2008_000009.jpg"


def test_voc_unparsable_xml_names_file(voc_root):
    (voc_root / "Annotations/2008_000002.xml").write_text("<annotation><object>")
    with pytest.raises(LabelError, match=r"2008_000002\.xml: unparsable XML"):
        voc_train_labels(voc_root)


def test_voc_unknown_class_names_file_and_class(voc_root):
    (voc_root / "Annotations/2008_000005.xml").write_text(_voc_xml("2008_000005", [("unicorn", 0)]))
    with pytest.raises(LabelError, match=r"2008_000005\.xml: <object> #0 has class name 'unicorn'"):
        voc_train_labels(voc_root)


def test_voc_missing_pieces(voc_root):
    with pytest.raises(LabelError, match=r"val\.txt: image list not found"):
        voc_train_labels(voc_root, image_set="val")
    (voc_root / "Annotations/2008_000009.xml").unlink()
    with pytest.raises(LabelError, match=r"2008_000009\.xml: annotation XML not found"):
        voc_train_labels(voc_root)
    with pytest.raises(LabelError, match=r"Main: folder not found"):
        voc_train_labels(voc_root.parent)


VOC_TEST_IDS = ["000005", "000001", "000003"]
VOC_TEST_FLAGS = {"dog": [1, 0, -1], "cat": [-1, 1, 0], "person": [1, 1, 1]}  # other classes: all -1


def _write_test_sets(root: Path) -> None:
    main = root / "ImageSets/Main"
    main.mkdir(parents=True, exist_ok=True)
    for cls in VOC_CLASSES:
        flags = VOC_TEST_FLAGS.get(cls, [-1, -1, -1])
        # VOC's own spacing: a positive flag is padded to the width of "-1".
        (main / f"{cls}_test.txt").write_text(
            "".join(f"{i} {f:2d}\n" for i, f in zip(VOC_TEST_IDS, flags, strict=True))
        )


def test_voc_test_rule(tmp_path):
    _write_test_sets(tmp_path)
    labels = voc_test_labels(tmp_path)
    assert labels.image_ids == VOC_TEST_IDS
    # flag 1 -> positive; 0 (difficult only) and -1 -> negative
    assert labels.labels.tolist() == [_row("dog", "person"), _row("cat", "person"), _row("person")]
    assert labels.file_names == [f"JPEGImages/{i}.jpg" for i in VOC_TEST_IDS]


def test_voc_test_class_files_must_agree(tmp_path):
    _write_test_sets(tmp_path)
    (tmp_path / "ImageSets/Main/bus_test.txt").write_text("000005 -1\n000001 -1\n000004 -1\n")
    with pytest.raises(LabelError, match=r"bus_test\.txt: lists different images than .*aeroplane_test\.txt"):
        voc_test_labels(tmp_path)


def test_voc_test_bad_flag_names_file_and_line(tmp_path):
    _write_test_sets(tmp_path)
    (tmp_path / "ImageSets/Main/cow_test.txt").write_text("000005 -1\n000001 2\n000003 -1\n")
    with pytest.raises(LabelError, match=r"cow_test\.txt, line 2: expected '<image id> <flag>'"):
        voc_test_labels(tmp_path)


# ------------------------------------------------------------------------------------------------------------ CSV


def test_label_csv_round_trip_and_errors(tmp_path):
    good = tmp_path / "labels.csv"
    good.write_text("image_id,a,b\nx1,1,0\nx2,0,0\n")
    labels = read_label_csv(good, file_name_pattern="{image_id}.png")
    assert labels.image_ids == ["x1", "x2"] and labels.class_names == ["a", "b"]
    assert labels.labels.tolist() == [[1, 0], [0, 0]] and labels.file_names == ["x1.png", "x2.png"]
    assert labels.subset([1]).image_ids == ["x2"]
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,a,b\nx1,1,2\n")
    with pytest.raises(LabelError, match=r"bad\.csv, data row 1 .*each 0 or 1"):
        read_label_csv(bad)
