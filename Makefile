# Each target installs what it needs first (idempotent), then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: install run test test-fast bench ui lint format clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: on these machines pip takes the CPU wheel on disk for this exact
	# version; a looser request would pull a multi-GB CUDA build. Users with GPUs keep theirs.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev,bench,dask,hf]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/mirrorinf run --params params.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  # the unit tests: no Prefect/MLflow/DVC end-to-end runs (about a minute)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/throughput.py

ui: $(STAMP)
	$(BIN)/mirrorinf ui

lint: $(STAMP)  # what CI checks before the tests
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy mirrorinf/engine

format: $(STAMP)
	$(BIN)/ruff check --fix -q .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
