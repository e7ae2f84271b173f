"""Ray Tune, above tracking: search spaces, the cluster and storage checks, the trial and the driver's callbacks,
the Tuner runner with plain grids (`run_configs`), and the Optuna + ASHA sweep with its results."""
