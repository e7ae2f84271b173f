"""Reading a built benchmark: its splits (image paths, observed and full labels), its card and its content digest.

A built benchmark is a directory holding `manifest.parquet` (image_id, file, split, full and observed labels as
fixed-size lists of C uint8) and `card.json` (see `comic.data.card`); `comic.data.build` writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from comic._io import UserError, stable_hash

MANIFEST, CARD_JSON, CARD_MD, CHART = "manifest.parquet", "card.json", "card.md", "class_distribution.png"
# The card fields that say what a benchmark holds; its paths (where the sources lie) are left out of the digest.
CONTENT_FIELDS = ("format_version", "builder_version", "benchmark", "parameters", "source_sha256", "class_names",
                  "sizes", "counts")


class BenchmarkError(UserError, ValueError):
    """A benchmark cannot be built or read; the message names the file, flag or config key at fault."""


def content_digest(card: dict) -> str:
    """Hash of what a benchmark holds (parameters, builder version, annotation checksums, label counts), not of
    where it lies: a moved data cache keeps its digest, and so its runs and cells."""
    return stable_hash({k: card.get(k) for k in CONTENT_FIELDS})


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
    def digest(self) -> str:
        """`content_digest` of the card."""
        return content_digest(self.card)

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def load_benchmark(path: str | Path) -> Benchmark:
    """Read a built benchmark directory (one holding card.json and manifest.parquet)."""
    root = Path(path).expanduser().resolve()
    if not (root / CARD_JSON).is_file():
        raise BenchmarkError(f"{root}: not a built benchmark (no {CARD_JSON}); build one with "
                             "`python -m comic.data build ...`")
    way_out = f"delete the folder {root} to have it rebuilt (or rebuild it with `python -m comic.data build ...`)"
    try:
        card = json.loads((root / CARD_JSON).read_text())
        names = card["class_names"]
    except (OSError, ValueError, KeyError) as err:
        raise BenchmarkError(f"{root / CARD_JSON}: damaged dataset card ({type(err).__name__}: {err}); "
                             f"{way_out}") from err
    try:
        table = pq.read_table(root / MANIFEST)
    except (OSError, ValueError) as err:  # missing, truncated (no Parquet footer), not Parquet
        raise BenchmarkError(f"{root / MANIFEST}: damaged manifest ({err}); {way_out}") from err
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


