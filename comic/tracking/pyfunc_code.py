"""The code file of every logged COMIC model (MLflow's "models from code", instead of a pickled object): MLflow copies
it into the model and runs it when the model is loaded."""

import mlflow

from comic.tracking.model import ComicModel

mlflow.models.set_model(ComicModel())
