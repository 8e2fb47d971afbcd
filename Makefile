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

.PHONY: install repro test test-lowest ui bench clean-outputs

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

# Two pytest processes (pytest-xdist), one test file each at a time: most of the suite waits on subprocesses
# (DVC, MLflow servers, Chromium, PostgreSQL), so two keep a 2-core machine busy. TEST_WORKERS=0 runs in one.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile

# The lowest allowed versions: every direct dependency pinned to its floor in pyproject.toml
# (.ci/floor_constraints.py), torch kept at the CPU wheel installed first, newest versions of everything else.
# Rebuilt from scratch whenever pyproject.toml changes. `echo '*'`: the venv ignores itself in git.
LOWEST := .venv-lowest
LOWBIN := $(LOWEST)/bin
LOWEST_STAMP := $(LOWEST)/.installed
# The code paths the floors matter for: config, loaders/preprocessing (nibabel, scipy, hypothesis), synthetic
# cohort (numpy, joblib workers, nilearn), probes/directions (scikit-learn), metrics (MONAI), models (einops),
# traversal GIFs (imageio), tracking/registry (MLflow, SQLAlchemy), tuning (Optuna) and a DVC remote (DVC).
# Not the slow end-to-end pipeline tests; the two-process Optuna test (a minute) is left to `make test`.
LOWEST_TESTS := tests/test_bad_input.py tests/test_loaders.py tests/test_preprocess.py \
	tests/test_preprocess_properties.py tests/test_synthetic.py tests/test_anatomy.py tests/test_probes.py \
	tests/test_directions.py tests/test_metrics.py tests/test_models_ae_vae.py tests/test_models_gan.py \
	tests/test_stylegan.py tests/test_featurenet.py tests/test_traversal.py tests/test_train.py \
	tests/test_tuning.py tests/test_dvc_remote.py --deselect tests/test_tuning.py::test_two_worker_processes_share_one_study

$(LOWEST_STAMP): pyproject.toml .ci/floor_constraints.py
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	echo '*' > $(LOWEST)/.gitignore
	$(LOWBIN)/pip install -q torch==2.13.0 "uv>=0.5,<1"
	$(LOWBIN)/python .ci/floor_constraints.py --installed torch > $(LOWEST)/floors.txt
	$(LOWBIN)/uv pip install -q --python $(LOWBIN)/python --resolution lowest-direct -c $(LOWEST)/floors.txt -e ".[test]"
	touch $@

test-lowest: $(LOWEST_STAMP)
	$(LOWBIN)/python -m pytest -q -p no:cacheprovider $(LOWEST_TESTS)

ui: install
	$(BIN)/brainlatent ui

bench: install
	$(BIN)/python benchmarks/run_all.py
