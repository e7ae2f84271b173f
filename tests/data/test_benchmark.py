"""Benchmark builder: idempotence, atomicity, card vs manifest, bad input, CLI (issue 2, acceptance e and f).

Sources are tiny synthetic COCO-format folders (real JSON + real JPEG files) made in tmp_path.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from comic.config import load_config
from comic.data import card as card_writer
from comic.data import synthetic
from comic.data.__main__ import main as cli_main
from comic.data.build import benchmark_key, build_benchmark, ensure_benchmark
from comic.data.labels import LabelError
from comic.data.longtail import pareto_subsample
from comic.data.reader import CARD_JSON, CARD_MD, CHART, MANIFEST, BenchmarkError, load_benchmark
from comic.data.sources import BuildParams, LabelSource, coco_root_source
from comic.metrics import shot_group_members

PARAMS = BuildParams(max_count=20, pareto_b=6.0, missing_rate=0.4, split_seed=0, val_size=5)


@pytest.fixture(scope="module")
def pristine_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("src") / "source", num_images=60, num_test_images=12,
                              num_classes=6, seed=3, image_size=48)


@pytest.fixture
def source(pristine_source: Path, tmp_path: Path) -> Path:
    """A private copy: tests may break it."""
    import shutil

    return Path(shutil.copytree(pristine_source, tmp_path / "source"))


def _build(source: Path, out: Path, params: BuildParams = PARAMS) -> Path:
    return build_benchmark(coco_root_source(source), params, out)


def _leftovers(out: Path) -> list[str]:
    """Benchmark directories and temporary build folders under `out`."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(("coco-format", ".coco-format"))) \
        if out.exists() else []


# -------------------------------------------------------------------------------------------- acceptance e ----

def test_second_run_does_no_work_and_keeps_the_hash(source: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    first = _build(source, out)
    card_mtime = (first / CARD_JSON).stat().st_mtime_ns

    def no_reading(self):
        raise AssertionError("labels were read again: the second build did work")

    monkeypatch.setattr(LabelSource, "read", no_reading)
    second = _build(source, out)
    assert second == first
    assert (second / CARD_JSON).stat().st_mtime_ns == card_mtime
    assert json.loads((second / CARD_JSON).read_text())["hash"].startswith(first.name.split("-")[-1])
    assert _leftovers(out) == [first.name]


def test_changed_parameters_or_annotations_give_a_new_hash(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = _build(source, out)
    other_rate = _build(source, out, BuildParams(**{**PARAMS.__dict__, "missing_rate": 0.3}))
    ann = source / synthetic.TEST_JSON
    ann.write_text(ann.read_text() + " ")  # same labels, different bytes: the checksum must notice
    other_ann = _build(source, out)
    assert len({base, other_rate, other_ann}) == 3


def test_interrupted_build_leaves_nothing_that_looks_complete(source: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the chart")

    monkeypatch.setattr(card_writer, "write_chart", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(source, out)
    assert _leftovers(out) == []
    monkeypatch.undo()
    built = _build(source, out)
    assert (built / CARD_JSON).is_file() and _leftovers(out) == [built.name]


def test_leftover_of_a_killed_build_is_cleaned_up(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"coco-format-{benchmark_key(coco_root_source(source), PARAMS)[:12]}"
    stale = out / f".{name}.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / MANIFEST).write_text("half written")
    built = _build(source, out)
    assert built.name == name and not stale.exists()
    assert load_benchmark(built).train.observed.shape[1] == 6


def test_card_counts_agree_with_manifest(source: Path, tmp_path: Path) -> None:
    built = _build(source, tmp_path / "out")
    card = json.loads((built / CARD_JSON).read_text())
    table = pq.read_table(built / MANIFEST).to_pydict()
    splits = np.asarray(table["split"])
    full, observed = (np.asarray(table[k], dtype=np.uint8) for k in ("full", "observed"))
    for name in ("train", "val", "test"):
        rows = splits == name
        assert card["sizes"][name] == rows.sum()
        assert card["counts"][name]["full"] == full[rows].sum(0).tolist()
        assert card["counts"][name]["observed"] == observed[rows].sum(0).tolist()
    train = splits == "train"
    assert (observed <= full).all() and (observed[~train] == full[~train]).all()
    assert (observed[train].sum(1) >= 1).all()  # every training image keeps a positive
    assert card["shot_groups"] == shot_group_members(observed[train].sum(0))
    assert card["sizes"]["val"] == PARAMS.val_size and card["sizes"]["test"] == 12
    assert not set(np.asarray(table["image_id"])[train]) & set(np.asarray(table["image_id"])[splits == "val"])
    for name in (CARD_MD, CHART):
        assert (built / name).stat().st_size > 0


def test_load_benchmark_splits(source: Path, tmp_path: Path) -> None:
    bench = load_benchmark(_build(source, tmp_path / "out"))
    assert bench.num_classes == 6 and bench.has_full_labels
    assert bench.train_counts.tolist() == bench.card["counts"]["train"]["observed"]
    for split in (bench.train, bench.val, bench.test):
        assert all(p.is_absolute() and p.is_file() for p in split.paths)
        assert split.observed.dtype == np.uint8 and split.full.shape == split.observed.shape
        assert all(isinstance(i, int) for i in split.image_ids)


def test_longtail_none_keeps_the_pool_except_val(source: Path, tmp_path: Path) -> None:
    params = BuildParams(longtail="none", missing_rate=0.0, val_size=10)
    bench = load_benchmark(_build(source, tmp_path / "out", params))
    assert len(bench.train) == 50 and len(bench.val) == 10 and not bench.has_full_labels
    assert np.array_equal(bench.train.observed, bench.train.full)


def test_rng_after_voc_continues_the_pareto_rng(source: Path, tmp_path: Path) -> None:
    voc_csv = tmp_path / "voc.csv"
    rng = np.random.default_rng(0)
    rows = [f"img{i},{','.join(str(int(v)) for v in rng.random(4) < 0.4)}" for i in range(40)]
    voc_csv.write_text("image_id,a,b,c,d\n" + "\n".join(rows) + "\n")
    params = BuildParams(**{**PARAMS.__dict__, "rng_after_voc": str(voc_csv), "voc_max_count": 10,
                               "voc_pareto_b": 6.0})
    bench = load_benchmark(_build(source, tmp_path / "out", params))
    from comic.data.labels import coco_labels, read_label_csv

    expected_rng = random.Random(0)
    pareto_subsample(read_label_csv(voc_csv).labels, 10, 6.0, rng=expected_rng)
    pool = coco_labels(source / synthetic.TRAIN_JSON)
    expected = pareto_subsample(pool.labels, PARAMS.max_count, PARAMS.pareto_b, rng=expected_rng)
    assert sorted(bench.train.image_ids) == sorted(pool.image_ids[r] for r in expected)


def test_synthetic_preset_has_all_three_shot_groups(tmp_path: Path) -> None:
    data = load_config("synthetic", [f"data.cache_dir={tmp_path}"]).data
    bench = load_benchmark(ensure_benchmark(data))
    groups = bench.card["shot_groups"]
    assert all(len(groups[g]) >= 2 for g in ("many", "medium", "few")), groups
    assert len(bench.val) == data.val_size and len(bench.test) == data.synthetic_test_images
    assert 900 <= len(bench.train) <= 1600
    data.root = str(bench.root)
    assert ensure_benchmark(data) == bench.root  # a built benchmark directory is used as is


# -------------------------------------------------------------------------------------------- acceptance f ----

def _rewrite_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _first_test_image(source: Path) -> Path:
    return sorted((source / "test").iterdir())[0]


@pytest.mark.parametrize("case", ["malformed-json", "unknown-category", "empty-source", "missing-image",
                                  "corrupt-image"])
def test_bad_source_is_an_error_naming_the_file(case: str, source: Path, tmp_path: Path) -> None:
    train_json = source / synthetic.TRAIN_JSON
    if case == "malformed-json":
        train_json.write_text(train_json.read_text()[:-20])
        culprit, error, words = train_json, LabelError, "malformed JSON"
    elif case == "unknown-category":
        _rewrite_json(train_json, lambda d: d["annotations"][3].update(category_id=999))
        culprit, error, words = train_json, LabelError, "category_id 999"
    elif case == "empty-source":
        _rewrite_json(train_json, lambda d: d.update(images=[], annotations=[]))
        culprit, error, words = train_json, LabelError, "empty"
    elif case == "missing-image":
        culprit, error, words = _first_test_image(source), BenchmarkError, "missing image file"
        culprit.unlink()
    else:
        culprit, error, words = _first_test_image(source), BenchmarkError, "corrupt image"
        culprit.write_bytes(culprit.read_bytes()[:200])
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        _build(source, out)
    assert str(culprit) in str(info.value) and words in str(info.value)
    assert _leftovers(out) == []


def test_source_without_positives_is_an_empty_source(source: Path, tmp_path: Path) -> None:
    train_json = source / synthetic.TRAIN_JSON
    _rewrite_json(train_json, lambda d: d.update(annotations=[]))
    with pytest.raises(BenchmarkError, match="empty source") as info:
        _build(source, tmp_path / "out")
    assert str(train_json) in str(info.value)


def test_bad_image_is_skipped_and_counted_with_the_flag(source: Path, tmp_path: Path) -> None:
    victim = _first_test_image(source)
    victim.unlink()
    bench = load_benchmark(_build(source, tmp_path / "out", BuildParams(**{**PARAMS.__dict__,
                                                                                 "skip_bad_images": True})))
    assert bench.card["skipped_count"] == 1
    assert bench.card["skipped_images"][0]["file"] == str(victim)
    assert len(bench.test) == 11 and victim not in bench.test.paths
    assert "Skipped images: 1" in (bench.root / CARD_MD).read_text()


@pytest.mark.parametrize("change, words", [
    ({"missing_rate": 1.0}, "missing_rate"),
    ({"missing_rate": -0.1}, "missing_rate"),
    ({"max_count": 3, "min_count": 5}, "max_count"),
    ({"val_size": 1000}, "val_size"),
])
def test_bad_parameter_is_an_error_naming_the_field(change: dict, words: str, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(BenchmarkError, match=words) as info:
        _build(source, out, BuildParams(**{**PARAMS.__dict__, **change}))
    if "val_size" in change:  # names the numbers: requested, available, pool, selected
        assert "1000" in str(info.value) and "60 in the pool" in str(info.value)
    assert _leftovers(out) == []


# ----------------------------------------------------------------------------------------------------- CLI ----

def test_cli_builds_and_prints_the_card(source: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["build", "coco-format", "--root", str(source), "--out", str(out), "--max-count", "20", "--pareto-b", "6",
            "--val-size", "5", "-q"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    built = next(out.glob("coco-format-*"))
    assert f"benchmark: {built}" in printed and "| split | images |" in printed
    assert built == _build(source, out)  # the CLI and the API agree on the hash


def test_cli_reports_errors_without_traceback(source: Path, tmp_path: Path, capsys) -> None:
    argv = ["build", "coco-format", "--root", str(source), "--out", str(tmp_path / "out"), "--val-size", "500", "-q"]
    assert cli_main(argv) == 2
    assert "--val-size" in capsys.readouterr().err
    assert cli_main(["build", "coco-format", "--root", str(source), "--missing-rate", "1.5", "-q"]) == 2
    assert "data.missing_rate=1.5" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- VOC ----

def _mini_voc(root: Path) -> tuple[Path, Path]:
    """VOC2012 (12 trainval images, XML) and VOC2007 (6 test images, ImageSets flags) with real JPEG files."""
    from PIL import Image

    from comic.data.labels import VOC_CLASSES

    rng = np.random.default_rng(0)
    voc12, voc07 = root / "VOC2012", root / "VOC2007"
    for voc in (voc12, voc07):
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (voc / sub).mkdir(parents=True)
    ids12 = [f"2012_{i:06d}" for i in range(12)]
    for i, image_id in enumerate(ids12):
        names = [VOC_CLASSES[c] for c in {i % 20, int(rng.integers(20))}]
        objects = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
        (voc12 / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
        Image.new("RGB", (40, 30), (i * 20, 90, 40)).save(voc12 / "JPEGImages" / f"{image_id}.jpg")
    (voc12 / "ImageSets/Main/trainval.txt").write_text("\n".join(ids12) + "\n")
    ids07 = [f"{i:06d}" for i in range(6)]
    for image_id in ids07:
        Image.new("RGB", (30, 40), (10, 200, 90)).save(voc07 / "JPEGImages" / f"{image_id}.jpg")
    for c, name in enumerate(VOC_CLASSES):
        flags = [1 if (c + k) % 7 == 0 else (0 if (c + k) % 7 == 1 else -1) for k in range(6)]
        (voc07 / f"ImageSets/Main/{name}_test.txt").write_text(
            "".join(f"{i} {f:2d}\n" for i, f in zip(ids07, flags, strict=True)))
    return voc12, voc07


def test_plt_voc_builds_from_xml_and_imagesets(tmp_path: Path, capsys) -> None:
    voc12, voc07 = _mini_voc(tmp_path / "VOCdevkit")
    argv = ["build", "plt-voc", "--root", str(tmp_path / "VOCdevkit"), "--out", str(tmp_path / "out"),
            "--longtail", "none", "--val-size", "2", "-q"]
    assert cli_main(argv) == 0
    built = Path(capsys.readouterr().out.strip().splitlines()[-1].split("benchmark: ")[1])
    bench = load_benchmark(built)
    assert (len(bench.train), len(bench.val), len(bench.test)) == (10, 2, 6)
    assert bench.train.paths[0].parent == voc12 / "JPEGImages" and bench.test.paths[0].parent == voc07 / "JPEGImages"
    assert isinstance(bench.test.image_ids[0], str) and bench.test.image_ids[0] == "000000"
    assert bench.test.full.sum() == sum(1 for c in range(20) for k in range(6) if (c + k) % 7 == 0)
    explicit = ["build", "plt-voc", "--voc2012", str(voc12), "--voc2007", str(voc07), "--out", str(tmp_path / "out"),
                "--longtail", "none", "--val-size", "2", "-q"]
    assert cli_main(explicit) == 0 and str(built) in capsys.readouterr().out  # same inputs, same hash
    (voc12 / "Annotations" / "2012_000003.xml").write_text("<annotation><object><name>cat</name></object>"
                                                           "</annotation>")
    assert cli_main(explicit) == 0 and str(built) not in capsys.readouterr().out  # XML edits change the hash


def test_a_validation_split_that_eats_the_pool_is_warned_about(source: Path, tmp_path: Path, caplog) -> None:
    """Issue 13 row 15: --longtail none with a --val-size over half the pool builds, with a warning naming the flag
    and how many images are left to train on."""
    with caplog.at_level("WARNING", logger="comic.data.build"):
        bench = load_benchmark(_build(source, tmp_path / "out", BuildParams(longtail="none", val_size=40)))
    assert len(bench.train) == 20 and len(bench.val) == 40
    (record,) = [r for r in caplog.records if "--val-size" in r.getMessage()]
    assert "only 20 are left to train on" in record.getMessage()


@pytest.mark.parametrize("damage", ["manifest", "card"])
def test_a_damaged_manifest_or_card_is_named_with_the_way_out(damage: str, source: Path, tmp_path: Path) -> None:
    """Issue 13: a real truncated manifest (Parquet without its footer) or card -> BenchmarkError naming the file and
    saying to delete the folder to have it rebuilt."""
    built = _build(source, tmp_path / "out")
    target = built / (MANIFEST if damage == "manifest" else CARD_JSON)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(BenchmarkError, match=f"{target}: damaged .*delete the folder {built}"):
        load_benchmark(built)
