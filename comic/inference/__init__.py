"""A trained model outside its training run: one file that maps image files to class scores and labels.

- `bundle`: `ModelBundle`, what a run exports (trunk, trained heads, preprocessing, class names, per-class decision
  thresholds, provenance), saved and loaded as one `torch.load(weights_only=True)`-safe file;
- `predictor`: `Predictor`, images (paths or encoded bytes) -> scores and labels, skipping unreadable files by name;
- `thresholds`: the per-class decision thresholds (F1 on the validation split).
Core: imports no ray / mlflow / optuna (the MLflow model flavour is `comic.tracking.model`).
"""
