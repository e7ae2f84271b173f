"""`Predictor`: image files or encoded image bytes -> class scores and labels, with a bundle's preprocessing."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from comic.data.images import eval_transform, load_eval_pixels
from comic.data.reader import BenchmarkError
from comic.inference.bundle import ModelBundle

log = logging.getLogger(__name__)

Image = Path | bytes


@dataclass(frozen=True)
class Prediction:
    """One image's result: `scores` [C] (sigmoid), or `error` (why the image could not be read) and no scores."""

    name: str
    scores: np.ndarray | None = None
    error: str | None = None


class Predictor:
    """A bundle's network on `device` with its preprocessing and decision thresholds (`predict`: score >= threshold).

    images: paths or encoded bytes (JPEG, PNG, ...) -> scores [N, C]; `predict_many` reports unreadable images by name
    instead of raising.
    """

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.device, self.batch_size = torch.device(device), batch_size
        self.network = bundle.network().to(self.device)
        self.class_names, self.prep = list(bundle.class_names), bundle.preprocess()
        self.thresholds = np.asarray(bundle.thresholds, dtype=np.float64)
        self.transform = eval_transform(self.prep)

    def tensor(self, image: Image) -> torch.Tensor:
        """One image -> float32 [3, S, S], as the training run's evaluation split saw it; BenchmarkError when it
        cannot be read."""
        source = io.BytesIO(image) if isinstance(image, bytes | bytearray) else Path(image)
        pixels = load_eval_pixels(source, self.prep)
        return self.transform(torch.from_numpy(np.array(pixels)).permute(2, 0, 1))

    @torch.inference_mode()
    def scores(self, images: Sequence[Image]) -> np.ndarray:
        """images -> sigmoid scores [N, C] (float64); the first unreadable image raises BenchmarkError."""
        batches = [self._score(torch.stack([self.tensor(im) for im in images[i:i + self.batch_size]]))
                   for i in range(0, len(images), self.batch_size)]
        return np.concatenate(batches) if batches else np.zeros((0, len(self.class_names)))

    def _score(self, batch: torch.Tensor) -> np.ndarray:
        logits = self.network(batch.to(self.device)).logits
        return torch.sigmoid(logits.float()).cpu().numpy().astype(np.float64)

    def labels(self, scores: np.ndarray) -> list[list[str]]:
        """scores [N, C] -> per image the class names whose score reaches the class's threshold."""
        chosen = np.asarray(scores) >= self.thresholds
        return [[self.class_names[c] for c in np.flatnonzero(row)] for row in chosen]

    def predict_many(self, images: Sequence[Image], names: Sequence[str] | None = None) -> Iterator[Prediction]:
        """Predictions in input order, a batch at a time; an unreadable image yields its `error`, the rest go on."""
        names = names if names is not None else [f"image {i}" for i in range(len(images))]
        pending: list[tuple[str, torch.Tensor]] = []
        for image, name in zip(images, names, strict=True):
            try:
                pending.append((name, self.tensor(image)))
            except BenchmarkError as err:
                yield from self._flush(pending)
                pending = []
                yield Prediction(name, error=str(err))
                continue
            if len(pending) == self.batch_size:
                yield from self._flush(pending)
                pending = []
        yield from self._flush(pending)

    @torch.inference_mode()
    def _flush(self, pending: list[tuple[str, torch.Tensor]]) -> Iterator[Prediction]:
        if pending:
            scores = self._score(torch.stack([t for _, t in pending]))
            yield from (Prediction(name, row) for (name, _), row in zip(pending, scores, strict=True))


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given and every file of a folder (recursively, sorted; hidden ones left out): a file that is not an
    image is reported by the predictor, never dropped in silence."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            found.append(path)
    return found
