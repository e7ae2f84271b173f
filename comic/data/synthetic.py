"""Procedural COCO-format multi-label image dataset: the embedded default source when no real data is at hand.

Each class is a (shape, colour, texture) triple, so recognising it needs more than a colour histogram: classes share
colours and shapes pairwise and only the combination identifies them. Images show 1-4 objects on varied, noisy
backgrounds with thin clutter lines. Class frequencies of the train pool are long-tailed (geometric prior), and half
of the images are "scenes" whose objects come from a small fixed group of classes, so the label co-occurrence that
the Pareto sampler ranks by is not uniform. The test split uses a flatter prior so every class has enough positives
for a stable average precision.

Layout written under `root` (the `coco-format` convention that `benchmark.py` reads):
    annotations/instances_train.json   annotations/instances_test.json   train/<id>.jpg   test/<id>.jpg

Everything is a function of the seed and the sizes: the same arguments give byte-identical annotation files.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from comic._io import make_temp_dir, publish_dir, remove_stale_temps, stable_hash
from comic.progress import progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # part of the source directory name: bump it whenever the generated content changes
SOURCE_SIZE = 128  # source image side in pixels (the cache then resizes to the preset's image size)
TRAIN_JSON = "annotations/instances_train.json"
TEST_JSON = "annotations/instances_test.json"

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond")
TEXTURES = ("solid", "striped", "dotted", "checkered")
COLOURS = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (235, 215, 30), "green": (35, 160, 55),
    "cyan": (30, 195, 205), "blue": (35, 70, 215), "purple": (125, 45, 185), "pink": (245, 110, 185),
    "brown": (125, 75, 35), "white": (240, 240, 240),
}


@dataclass(frozen=True)
class SyntheticClass:
    """One class: its appearance attributes and its COCO category id (ids have gaps, like COCO's)."""

    cat_id: int
    shape: str
    colour: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.texture}-{self.colour}-{self.shape}"


def make_classes(num_classes: int) -> list[SyntheticClass]:
    """A fixed (seed-independent) list of classes whose attribute triples differ as much as possible.

    Greedy over a fixed shuffle of all triples: take triples that differ from every chosen one in >= 2 attributes
    while possible (32 of them exist), then in >= 1.
    """
    triples = [(s, c, t) for s in range(len(SHAPES)) for c in range(len(COLOURS)) for t in range(len(TEXTURES))]
    if num_classes > len(triples):
        raise ValueError(f"num_classes={num_classes}: at most {len(triples)} synthetic classes exist")
    order = np.random.default_rng(20230).permutation(len(triples))
    chosen: list[tuple[int, int, int]] = []
    for min_diff in (2, 1):
        for idx in order:
            triple = triples[idx]
            if len(chosen) < num_classes and triple not in chosen and all(
                    sum(a != b for a, b in zip(triple, other, strict=True)) >= min_diff for other in chosen):
                chosen.append(triple)
    colour_names = list(COLOURS)
    return [SyntheticClass(cat_id=k + 1 + k // 3, shape=SHAPES[s], colour=colour_names[c], texture=TEXTURES[t])
            for k, (s, c, t) in enumerate(chosen)]


def class_prior(num_classes: int, ratio: float) -> np.ndarray:
    """Geometric class prior [C] whose first/last ratio is `ratio` (class 0 is the most frequent)."""
    decay = ratio ** (-1.0 / max(num_classes - 1, 1))
    weights = decay ** np.arange(num_classes)
    return weights / weights.sum()


def make_scenes(num_classes: int) -> list[np.ndarray]:
    """Fixed co-occurrence groups of class indices, like COCO's "street" or "kitchen".

    Class 0 (the "person" of this world) is in every scene and classes 1-2 alternate; every other class belongs
    to exactly one scene. Frequent classes thus co-occur with everything, which is what makes them rank first in
    the Pareto sampler's co-occurrence ordering, as in real data.
    """
    num_scenes = max(2, num_classes // 5)
    return [np.array(sorted({0, min(1 + s % 2, num_classes - 1)} | set(range(3 + s, num_classes, num_scenes))))
            for s in range(num_scenes)]


# ----------------------------------------------------------------------------------------------------- drawing ----

def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices on the unit disc for the polygonal shapes."""
    if shape == "square":
        return [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in np.linspace(-math.pi / 2, 1.5 * math.pi, 3, endpoint=False)]
    if shape == "hexagon":
        return [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 6, endpoint=False)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)]
    if shape == "star":
        angles = np.linspace(-math.pi / 2, 1.5 * math.pi, 10, endpoint=False)
        return [(r * math.cos(a), r * math.sin(a)) for a, r in zip(angles, [1.0, 0.42] * 5, strict=True)]
    if shape == "cross":
        a, b = 0.32, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a)]
    raise ValueError(f"unknown polygon shape {shape!r}")


def shape_mask(shape: str, size: int, angle: float) -> np.ndarray:
    """Boolean mask [size, size] of a shape filling the square, rotated by `angle` radians."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    half = (size - 1) / 2
    if shape in ("circle", "ring"):
        draw.ellipse((0, 0, size - 1, size - 1), fill=255)
        if shape == "ring":
            inset = size * 0.3
            draw.ellipse((inset, inset, size - 1 - inset, size - 1 - inset), fill=0)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        points = [(half + half * (x * cos - y * sin), half + half * (x * sin + y * cos)) for x, y in
                  _unit_polygon(shape)]
        draw.polygon(points, fill=255)
    return np.asarray(canvas) > 127


def texture_patch(texture: str, colour: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Float RGB patch [size, size, 3] of a texture in a colour; the pattern period scales with the object."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = max(4.0, size / 4.5)
    dark = colour * 0.35
    if texture == "solid":
        pattern = np.zeros((size, size), dtype=bool)
    elif texture == "striped":
        theta = rng.uniform(0, math.pi)
        pattern = np.mod((xx * math.cos(theta) + yy * math.sin(theta)) / period, 1.0) < 0.5
    elif texture == "dotted":
        pattern = (np.mod(xx, period) - period / 2) ** 2 + (np.mod(yy, period) - period / 2) ** 2 < (period / 3.2) ** 2
    else:  # checkered
        pattern = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 0
    shade = 1.0 - 0.25 * (yy / size)  # a little lighting so solid objects are not flat
    patch = np.where(pattern[..., None], dark, colour) * shade[..., None]
    return patch


def background(rng: np.random.Generator, side: int) -> np.ndarray:
    """Float RGB background [side, side, 3]: low-frequency desaturated colour field, noise and clutter lines."""
    base = rng.uniform(60, 200)
    grid = base + rng.normal(0, 35, size=(4, 4, 3)) + rng.normal(0, 20, size=(1, 1, 3))
    grid = np.clip(grid, 0, 255).astype(np.uint8)
    field = Image.fromarray(grid, "RGB").resize((side, side), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(rng.integers(0, 4)):
        grey = int(rng.uniform(40, 220))
        tint = tuple(int(np.clip(grey + rng.normal(0, 15), 0, 255)) for _ in range(3))
        ends = [tuple(float(v) for v in rng.uniform(0, side, 2)) for _ in range(2)]
        draw.line(ends, fill=tint, width=int(rng.integers(1, 3)))
    arr = np.asarray(field, dtype=np.float32)
    return arr + rng.normal(0, 6, size=arr.shape)


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Per-object colour variation: brightness and a small per-channel shift, so colour alone is not a constant."""
    rgb = np.asarray(colour, dtype=np.float32) * rng.uniform(0.8, 1.1) + rng.normal(0, 10, 3)
    return np.clip(rgb, 0, 255)


def _place(rng: np.random.Generator, side: int, size: int, boxes: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """Top-left corner for a new object, avoiding heavy overlap with earlier ones (best of a few tries)."""
    best, best_overlap = (0, 0), float("inf")
    for _ in range(8):
        x, y = (int(v) for v in rng.integers(0, side - size + 1, 2))
        overlap = max((_inter(x, y, size, box) / float(size * size) for box in boxes), default=0.0)
        if overlap < best_overlap:
            best, best_overlap = (x, y), overlap
        if overlap < 0.15:
            break
    return best


def _inter(x: int, y: int, size: int, box: tuple[int, int, int, int]) -> int:
    bx, by, bw, bh = box
    return max(0, min(x + size, bx + bw) - max(x, bx)) * max(0, min(y + size, by + bh) - max(y, by))


def render_image(rng: np.random.Generator, classes: list[SyntheticClass], picks: list[int],
                 side: int) -> tuple[Image.Image, list[dict]]:
    """Draw the picked classes (indices into `classes`) on a background; returns the image and COCO boxes."""
    canvas = background(rng, side)
    boxes: list[tuple[int, int, int, int]] = []
    objects = []
    for k in picks:
        cls = classes[k]
        size = int(rng.uniform(0.24, 0.45) * side)
        mask = shape_mask(cls.shape, size, float(rng.uniform(0, 2 * math.pi)))
        patch = texture_patch(cls.texture, _jitter(COLOURS[cls.colour], rng), size, rng)
        x, y = _place(rng, side, size, boxes)
        region = canvas[y:y + size, x:x + size]
        region[mask] = patch[mask]
        ys, xs = np.nonzero(mask)
        left, top = x + int(xs.min()), y + int(ys.min())
        bbox = [float(left), float(top), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        boxes.append((x, y, size, size))
        objects.append({"category_id": cls.cat_id, "bbox": bbox, "area": float(mask.sum())})
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    return image, objects


# ------------------------------------------------------------------------------------------------ generation ----

def sample_picks(rng: np.random.Generator, prior: np.ndarray, scenes: list[np.ndarray]) -> list[int]:
    """Class indices of the 1-4 objects of one image; half the images are scenes from one co-occurrence group."""
    count = int(rng.choice(4, p=[0.3, 0.35, 0.22, 0.13])) + 1
    if rng.random() < 0.5:
        scene = scenes[int(rng.integers(len(scenes)))]
        weights = prior[scene]
        return [int(v) for v in rng.choice(scene, size=count, p=weights / weights.sum())]
    return [int(v) for v in rng.choice(len(prior), size=count, p=prior)]


def _split(root: Path, split: str, first_id: int, count: int, seed: int, classes: list[SyntheticClass],
           prior: np.ndarray, side: int) -> dict:
    """Generate one split's JPEG files under root/<split>/ and return its COCO instances dict."""
    scenes = make_scenes(len(classes))
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in progress(range(count), desc=f"synthetic {split}", unit="img", leave=False):
        image_id = first_id + i
        # One generator per image: the content of an image does not depend on how many came before it.
        rng = np.random.default_rng([seed, first_id, i])
        image, objects = render_image(rng, classes, sample_picks(rng, prior, scenes), side)
        file_name = f"{image_id:012d}.jpg"
        image.save(root / split / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": side, "height": side})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                                "segmentation": [], **obj})
    categories = [{"id": c.cat_id, "name": c.name, "supercategory": c.shape} for c in classes]
    info = {"description": f"COMIC Lab synthetic source ({split})", "version": str(FORMAT_VERSION),
            "seed": seed, "date_created": "n/a"}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories, "licenses": []}


def generate(root: str | Path, num_images: int = 1200, num_test_images: int = 400, num_classes: int = 20,
             seed: int = 0, image_size: int = SOURCE_SIZE) -> Path:
    """Write a synthetic COCO-format source into `root` (a new or empty folder); returns `root`.

    Train pool prior: geometric, first/last class frequency ratio 25; test prior: ratio 3.
    """
    root = Path(root)
    classes = make_classes(num_classes)
    splits = {"train": (1, num_images, class_prior(num_classes, 25.0)),
              "test": (1_000_001, num_test_images, class_prior(num_classes, 3.0))}
    for split, (first_id, count, prior) in splits.items():
        coco = _split(root, split, first_id, count, seed, classes, prior, image_size)
        path = root / (TRAIN_JSON if split == "train" else TEST_JSON)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(coco, sort_keys=True, separators=(",", ":")))
    return root


def source_key(num_images: int, num_test_images: int, num_classes: int, seed: int, image_size: int) -> str:
    """Directory name of a generated source: a hash of everything that determines its content."""
    parts = [FORMAT_VERSION, num_images, num_test_images, num_classes, seed, image_size]
    return f"synthetic-source-{stable_hash(parts, 12)}"


def ensure_source(cache_dir: str | Path, num_images: int = 1200, num_test_images: int = 400, num_classes: int = 20,
                  seed: int = 0, image_size: int = SOURCE_SIZE) -> Path:
    """Generate the synthetic source under `cache_dir` unless it is already there; returns its directory.

    Generation goes to a temporary sibling that is renamed at the end, so a directory with the final name is always
    complete (a concurrent generator of the same source simply loses the rename race and reuses the winner's).
    """
    cache_dir = Path(cache_dir).resolve()
    final = cache_dir / source_key(num_images, num_test_images, num_classes, seed, image_size)
    if (final / TEST_JSON).is_file():
        log.info("synthetic source %s already exists", final)
        return final
    remove_stale_temps(cache_dir, final.name)
    tmp = make_temp_dir(cache_dir, final.name)
    try:
        log.info("generating synthetic source (%d + %d images, %d classes, seed %d) in %s", num_images,
                 num_test_images, num_classes, seed, final)
        generate(tmp, num_images, num_test_images, num_classes, seed, image_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final, TEST_JSON)
    return final
