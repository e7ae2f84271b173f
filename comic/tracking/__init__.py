"""MLflow tracking, above the core: the store (absolute URIs, experiments), one run per `RunTracker` (`client`),
provenance tags and the code version, and `tracked_fit` (`run`: a training run with its whole MLflow record)."""
