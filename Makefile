# Set-up and everyday commands. Every target builds the virtual environment from scratch
# when it is missing; torch is pinned to the CPU wheel (2.13.0) so no CUDA build is pulled.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

# core install: what `ranreg demo`, `register`, `train` and `evaluate` need
$(VENV)/.core: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e .
	touch $@

# tests also exercise the comparison peers (optional extra: voxelmorph, antspyx, convexAdam)
$(VENV)/.test: $(VENV)/.core
	$(BIN)/pip install -q $(TORCH_PIN) -e '.[test,peers]'
	touch $@

.PHONY: setup demo test lint
setup: $(VENV)/.core

demo: $(VENV)/.core
	$(BIN)/ranreg demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(VENV)/.test
	$(BIN)/python -m pytest -q

lint: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
