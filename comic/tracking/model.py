"""A run's model in MLflow: a `pyfunc` (DataFrame of images -> one score column per class plus the predicted labels),
logged to the run, registered under a name with an alias, and found again from a `models:/`, `runs:/` or local URI.

The pyfunc's input is a column `image` of image file paths or base64-encoded image bytes (what `mlflow models serve`
receives as JSON); its only artifact is the `comic.inference` bundle file, so the model carries its trunk, heads,
preprocessing, thresholds and provenance.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import os
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelInput
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image as PILImage

from comic._io import UserError
from comic.config import Config
from comic.inference.bundle import BUNDLE_FILE, ModelBundle, export_run
from comic.inference.predictor import Predictor
from comic.tracking.client import RunTracker

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name in its run
ARTIFACT = "bundle"
INPUT_COLUMN, LABELS_COLUMN = "image", "labels"
DEFAULT_ALIAS = "champion"
MODEL_DIR = "model"  # in a run's work directory: the exported bundle
MODEL_URI_TAG = "model_uri"
PROGRESS_BAR_VARIABLE = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
CODE_FILE = Path(__file__).with_name("pyfunc_code.py")  # the model's code: `ComicModel()`, imported when it loads
REQUIREMENTS = ("comic-lab", "torch", "torchvision", "mlflow", "pandas", "pillow", "numpy")


class ModelNotFound(UserError):
    """A model URI or path that holds no COMIC model; the message names it."""


class ComicModel(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour: `predict(DataFrame[image]) -> DataFrame[<class>..., labels]` (labels joined by ';')."""

    def load_context(self, context) -> None:
        self.predictor = Predictor(ModelBundle.load(context.artifacts[ARTIFACT]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """model_input: DataFrame with column `image` (paths or base64 strings / bytes) -> DataFrame [N, C + 1]."""
        frame = model_input
        if INPUT_COLUMN not in frame:
            raise ValueError(f"the input needs a column {INPUT_COLUMN!r} (image paths or base64-encoded images); "
                             f"got columns {list(frame.columns)}")
        scores = self.predictor.scores([as_image(value) for value in frame[INPUT_COLUMN]])
        out = pd.DataFrame(scores, columns=self.predictor.class_names)
        out[LABELS_COLUMN] = [";".join(names) for names in self.predictor.labels(scores)]
        return out


def as_image(value) -> Path | bytes:
    """An input cell -> image bytes or a path: bytes as they are; a string naming an existing file is a path, any
    other string must be base64."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    text = str(value)
    if len(text) < 4096 and Path(text).is_file():
        return Path(text)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"image {text[:60]!r}: neither an existing file nor base64-encoded bytes") from err


def signature(class_names: list[str]) -> ModelSignature:
    outputs = [ColSpec("double", name) for name in class_names] + [ColSpec("string", LABELS_COLUMN)]
    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]), outputs=Schema(outputs))


def example_input(size: int) -> pd.DataFrame:
    """A one-row input: a mid-grey JPEG of the model's input size, base64-encoded."""
    buffer = io.BytesIO()
    PILImage.fromarray(np.full((size, size, 3), 128, dtype=np.uint8)).save(buffer, format="JPEG")
    return pd.DataFrame({INPUT_COLUMN: [base64.b64encode(buffer.getvalue()).decode("ascii")]})


@contextlib.contextmanager
def tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent calls (model logging, registration) against `uri`, the process's own setting restored after."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    bar = os.environ.get(PROGRESS_BAR_VARIABLE)
    mlflow.set_tracking_uri(uri)
    os.environ[PROGRESS_BAR_VARIABLE] = "false"  # MLflow's download bars would interleave with the scripts' output
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None: unset again
        if bar is None:
            os.environ.pop(PROGRESS_BAR_VARIABLE, None)
        else:
            os.environ[PROGRESS_BAR_VARIABLE] = bar


def log_model(tracking_uri: str, run_id: str, bundle: ModelBundle, bundle_file: Path) -> str:
    """Log `bundle` (saved at `bundle_file`) as run `run_id`'s pyfunc model `model`; returns its `models:/<model_id>`
    URI."""
    with tracking(tracking_uri):
        info = Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                         python_model=str(CODE_FILE), artifacts={ARTIFACT: str(bundle_file)},
                         signature=signature(bundle.class_names), input_example=example_input(bundle.image_size),
                         pip_requirements=_requirements(), metadata={"comic": bundle.provenance})
    log.info("logged model %s of run %s", info.model_uri, run_id)
    return info.model_uri


def log_best_model(tracker: RunTracker, cfg: Config, workdir: Path) -> str:
    """Export the run's best-on-val model into `workdir/model/` and log it as the run's MLflow model; returns its
    URI, also set as the run's tag `model_uri`."""
    bundle = export_run(cfg, workdir, tracker.run_id)
    path = bundle.save(Path(workdir) / MODEL_DIR / BUNDLE_FILE)
    uri = log_model(tracker.tracking_uri, tracker.run_id, bundle, path)
    tracker.set_tags({MODEL_URI_TAG: uri})
    return uri


def register_model(tracking_uri: str, model_uri: str, name: str, alias: str = DEFAULT_ALIAS,
                   tags: dict[str, str] | None = None) -> str:
    """Register `model_uri` as a new version of `name`, point `alias` at it; returns `models:/name@alias`."""
    with tracking(tracking_uri):
        version = mlflow.register_model(model_uri, name, tags=tags)
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    log.info("registered %s version %s as %s@%s", model_uri, version.version, name, alias)
    return f"models:/{name}@{alias}"


def bundle_path(model: str, tracking_uri: str) -> Path:
    """The bundle file of a model named by a local path (the bundle, or an MLflow model folder) or by a
    `models:/...` / `runs:/...` URI (downloaded); ModelNotFound naming it otherwise."""
    local = Path(model).expanduser()
    if not local.exists():
        if not model.startswith(("models:/", "runs:/")):
            raise ModelNotFound(f"--model {model!r}: no such file or folder, and not a models:/ or runs:/ URI")
        try:
            uri = _run_model(model, tracking_uri) if model.startswith("runs:/") else model
            with tracking(tracking_uri):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except mlflow.exceptions.MlflowException as err:
            raise ModelNotFound(f"--model {model!r}: {err.message} (tracking store {tracking_uri})") from err
    for candidate in (local, local / BUNDLE_FILE, local / "artifacts" / BUNDLE_FILE):
        if candidate.is_file():
            return candidate
    raise ModelNotFound(f"--model {model!r}: {local} holds no {BUNDLE_FILE}")


def link_model_input(tracker: RunTracker, model: str) -> None:
    """Record `model` (a `models:/` or `runs:/` URI; a local path has no MLflow id) as the run's model input, so the
    run page links to the logged model it used (an evaluation)."""
    if model.startswith("runs:/"):
        model = _run_model(model, tracker.tracking_uri)
    ref = model.removeprefix("models:/") if model.startswith("models:/") else ""
    mlflow_client = mlflow.MlflowClient(tracker.tracking_uri)
    if "@" in ref:
        ref = mlflow_client.get_model_version_by_alias(*ref.split("@", 1)).model_id
    elif "/" in ref:
        ref = mlflow_client.get_model_version(*ref.split("/", 1)).model_id
    if ref:
        mlflow_client.log_inputs(tracker.run_id, models=[LoggedModelInput(ref)])


def _run_model(uri: str, tracking_uri: str) -> str:
    """`runs:/<run id>[/model]` -> the `models:/<model id>` that run logged (its tag `model_uri`)."""
    run_id = uri.removeprefix("runs:/").split("/", 1)[0]
    tags = mlflow.MlflowClient(tracking_uri).get_run(run_id).data.tags
    if MODEL_URI_TAG not in tags:
        raise ModelNotFound(f"--model {uri!r}: run {run_id} logged no model (train it with experiments/train.py, or "
                            "pass a models:/ URI or a model folder)")
    return tags[MODEL_URI_TAG]


def _requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins
