# Two entry points for a fresh machine (Python 3.11 + pip): `make repro` and `make test`.
# Both create .venv when missing, install (torch==2.13.0 CPU first, see DEVELOPERS.md) and are re-runnable.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg
export GIT_PYTHON_REFRESH := quiet

.PHONY: install repro test ui bench clean-outputs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# `dvc repro` needs a git repository (DVC stores stage hashes beside git) and a DVC project.
repro: install
	@git rev-parse --git-dir >/dev/null 2>&1 || git init -q
	@[ -d .dvc ] || $(BIN)/dvc init -q
	$(BIN)/dvc config core.analytics false
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest -q

ui: install
	$(BIN)/brainlatent ui

bench: install
	$(BIN)/python benchmarks/run_all.py
