# Two entry points for a fresh machine: `make demo` (set up + dvc repro on the bundled demo) and
# `make test` (set up + the test suite). Set-up installs into .venv with the pinned constraints.txt.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV)/bin):$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: setup demo demo-methods test test-fast lint bench slurm-test

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	dvc repro
	dvc metrics show
	@echo "Report: outputs/report/index.html   Runs: mlflow ui --backend-store-uri sqlite:///mlflow.db, then"
	@echo "  http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning (MLflow 3 opens GenAI otherwise)"

# After `make demo`: CoOp, CoCoOp and KgCoOp under base-to-new and cross-dataset transfer on the same world.
demo-methods: demo
	python -m stages.sweep --params configs/world_methods.yaml
	python -m stages.report --params configs/world_methods.yaml
	@echo "Report: outputs/methods/report/index.html (base-to-new and cross-dataset tables)"

test: $(STAMP)
	ruff check .
	python -m pytest

test-fast: $(STAMP)  # the inner loop: ruff and every test not marked slow (no Ray, MLflow server, DVC runs)
	ruff check .
	python -m pytest -m "not slow" -q

lint: $(STAMP)
	ruff check .

bench: $(STAMP)
	python bench/step.py

# cluster/slurm/coop-sweep.sbatch on a one-node SLURM the test starts on loopback (needs root and
# `apt-get install slurm-wlm munge`; skipped without them). About 8 minutes.
slurm-test: $(STAMP)
	python -m pytest tests/test_slurm.py -v
