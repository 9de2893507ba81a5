# Two commands do all set-up on a fresh machine: `make run` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Offline and quiet: no hub downloads, no telemetry (see ../shared/STACK-NOTES.md for why each is needed).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_LOGGING_LEVEL := WARNING

.PHONY: install run run-full test test-fast lint compile clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the pinned CPU build is found locally; any other spec pulls gigabytes of CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/fusionrank run --local

run-full: install
	$(BIN)/fusionrank run --local --full

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

compile: install
	$(BIN)/fusionrank compile --output build/fusionrank-pipeline.yaml

clean:
	rm -rf build runs .fusionrank .pytest_cache .ruff_cache

# `make images`: the component images (Dockerfile targets cpu and gpu), where a Docker engine exists.
include deploy/images.mk
