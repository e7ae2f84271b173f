"""What a build writes: the Parquet manifest, the dataset card (card.json, card.md) and the class-distribution chart.

card.json holds class names, sizes, full / observed counts per split, shot groups (from observed train counts),
the build parameters, the sources and their annotation checksums; card.md summarises it for people.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from comic.data.labels import LabelSet
from comic.data.reader import CARD_JSON, CARD_MD, CHART, MANIFEST
from comic.data.sources import BuildParams, Source
from comic.metrics import FEW_BELOW, MANY_MIN, shot_group_members

BUILDER_VERSION = 1


@dataclass
class BuildContent:
    """What a build writes: per-split rows of the source label sets, observed train labels, card."""

    pool: LabelSet
    test: LabelSet
    rows: dict[str, list[int]]
    observed_train: np.ndarray
    card: dict = field(default_factory=dict)


def make_card(source: Source, params: BuildParams, content: BuildContent, skipped: list[dict]) -> dict:
    """The dataset card (card.json) of a build."""
    labels = _split_labels(content)
    counts = {name: {"full": full.sum(0).astype(int).tolist(), "observed": obs.sum(0).astype(int).tolist()}
              for name, (full, obs) in labels.items()}
    train_full, train_obs = labels["train"]
    ids = content.pool.image_ids + content.test.image_ids
    return {
        "format_version": 1, "builder_version": BUILDER_VERSION, "benchmark": source.kind,
        "parameters": params.hashed(),
        "sources": {"pool": source.pool.describe(), "test": source.test.describe()},
        "image_roots": {"pool": str(source.pool.image_root), "test": str(source.test.image_root)},
        "image_id_type": "int" if all(isinstance(i, int) for i in ids) else "str",
        "class_names": list(content.pool.class_names),
        "sizes": {"pool": content.pool.num_images, "source_test": content.test.num_images,
                  **{name: len(rows) for name, rows in content.rows.items()}},
        "counts": counts,
        "labels": {"train_full": int(train_full.sum()), "train_observed": int(train_obs.sum()),
                   "train_retention": round(float(train_obs.sum() / max(train_full.sum(), 1)), 4)},
        "shot_thresholds": {"many": MANY_MIN, "few": FEW_BELOW},
        "shot_groups": shot_group_members(train_obs.sum(0)),
        "skipped_images": skipped, "skipped_count": len(skipped),
        "files": {"manifest": MANIFEST, "summary": CARD_MD, "chart": CHART},
    }


def _split_labels(content: BuildContent) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(full, observed) [N, C] per split; val and test are fully observed."""
    train_full = content.pool.labels[content.rows["train"]]
    val = content.pool.labels[content.rows["val"]]
    test = content.test.labels[content.rows["test"]]
    return {"train": (train_full, content.observed_train), "val": (val, val), "test": (test, test)}


def write_benchmark(folder: Path, content: BuildContent) -> None:
    """Write manifest, chart, summary and (last) card.json into `folder`."""
    write_manifest(folder / MANIFEST, content)
    write_chart(folder / CHART, content.card)
    (folder / CARD_MD).write_text(card_summary(content.card))
    (folder / CARD_JSON).write_text(json.dumps(content.card, indent=1) + "\n")


def write_manifest(path: Path, content: BuildContent) -> None:
    """manifest.parquet: image_id, file, split, full / observed as fixed-size lists of C uint8."""

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
             f"validation size {p['val_size']}.", *_fold_line(p), "",
             "| split | images | full labels | observed labels |", "|---|---:|---:|---:|"]
    for split in ("train", "val", "test"):
        lines.append(f"| {split} | {sizes[split]:,} | {sum(counts[split]['full']):,} | "
                     f"{sum(counts[split]['observed']):,} |")
    obs = counts["train"]["observed"]
    lines += ["", f"Train label retention {card['labels']['train_retention']:.1%}; observed train counts: max "
              f"{max(obs)} ({names[int(np.argmax(obs))]}), min {min(obs)} ({names[int(np.argmin(obs))]}).",
              f"Shot groups (observed train counts; many >= {MANY_MIN}, few < {FEW_BELOW}): many "
              f"{len(groups['many'])}, medium {len(groups['medium'])}, few {len(groups['few'])}.",
              f"Skipped images: {card['skipped_count']}.", "", "| class | train full | train observed | group |",
              "|---|---:|---:|---|"]
    group_of = {c: g for g, members in groups.items() for c in members}
    for c in np.argsort(-np.asarray(obs), kind="stable"):
        lines.append(f"| {names[c]} | {counts['train']['full'][c]} | {obs[c]} | {group_of[int(c)]} |")
    lines += ["", f"Hash `{card['hash']}`; chart `{CHART}`; manifest `{MANIFEST}`.", ""]
    return "\n".join(lines)


def _fold_line(p: dict) -> list[str]:
    if not p.get("folds"):
        return []
    return ["", f"Test fold {p['fold']} of {p['folds']}: the pool and test images of the sources together, cut into "
                f"{p['folds']} disjoint test folds (split seed {p['split_seed']}); train and val come from the other "
                "folds."]


def write_chart(path: Path, card: dict) -> None:
    """PNG of full vs observed train counts per class, sorted by observed count, shot-group bands shaded."""

    full = np.asarray(card["counts"]["train"]["full"])
    obs = np.asarray(card["counts"]["train"]["observed"])
    order = np.argsort(-obs, kind="stable")
    names = [card["class_names"][i] for i in order]
    x = np.arange(len(order))
    fig = Figure(figsize=(max(6.0, 0.16 * len(order) + 2), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = max(float(full.max()), MANY_MIN) * 1.6
    for lo, hi, colour, label in ((MANY_MIN, top, "#2a9d8f", "many"), (FEW_BELOW, MANY_MIN, "#e9c46a", "medium"),
                                  (0.8, FEW_BELOW, "#e76f51", "few")):
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


