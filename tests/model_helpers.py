"""Helpers shared by the model tests (tests/tracking/test_model.py) and the sweep's registry test."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from comic.data.images import ImageDataset
from comic.data.reader import Split
from comic.device import runtime
from comic.engine import predict
from comic.inference.bundle import ModelBundle
from comic.tracking.model import bundle_path, tracking

VOC_PHOTOS = ("000012.jpg", "000017.jpg", "000023.jpg")


def voc_photos(shared_data: Path) -> list[Path]:
    return [shared_data / "voc2007-dev" / "VOCdevkit" / "VOC2007" / "JPEGImages" / name for name in VOC_PHOTOS]



def pyfunc_agrees_with_scripts(uri: str, model_uri: str, photos: list[Path], script, tmp_path) -> None:
    """The pyfunc (paths and base64), predict.py and the evaluation path (ImageDataset + engine.predict) score the
    same photos the same."""
    with tracking(uri):
        pyfunc = mlflow.pyfunc.load_model(model_uri)
        by_path = pyfunc.predict(pd.DataFrame({"image": [str(p) for p in photos]}))
        by_bytes = pyfunc.predict(pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in photos]}))
    bundle = ModelBundle.load(bundle_path(model_uri, uri))
    classes = bundle.class_names
    assert list(by_path.columns) == [*classes, "labels"] and np.array_equal(by_path[classes], by_bytes[classes])
    out = tmp_path / "p.csv"
    assert script("experiments/predict.py").main(["--model", model_uri, "--tracking-uri", uri, *map(str, photos),
                                                  "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert np.allclose([[float(r[c]) for c in classes] for r in rows], by_path[classes], atol=1e-6)
    split = Split(list(range(len(photos))), photos, np.zeros((3, len(classes)), np.uint8),
                  np.zeros((3, len(classes)), np.uint8))
    loader = torch.utils.data.DataLoader(ImageDataset(split, bundle.preprocess(), train=False), batch_size=2)
    scores, _ = predict(bundle.network(), loader, runtime(bundle.cfg.engine))
    assert np.allclose(scores["logits"], by_path[classes], atol=1e-6)
