# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint ui clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

DEMO_ARGS ?=

demo: $(STAMP)
	$(PY) experiments/sweep.py $(DEMO_ARGS)

test: $(STAMP)
	RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q

# The MLflow UI on the default store (./mlruns/mlflow.db): http://127.0.0.1:5000
ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000

lint: $(STAMP)
	$(PY) -m ruff check comic experiments ablations benchmarks tests

clean-venv:
	rm -rf $(VENV)
