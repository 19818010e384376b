# Set-up and everyday commands. Both targets build the virtual environment from scratch
# when it is missing; torch is pinned to the CPU wheel (2.13.0) so no CUDA build is pulled.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

$(BIN)/ranreg: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: setup demo test lint
setup: $(BIN)/ranreg

demo: setup
	$(BIN)/ranreg summary --model RAN4+ --ndim 3 --shape 96 80 128

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
