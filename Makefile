# The README's commands. `make setup` once, then `make test`; .ci/run does exactly that on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup lint format test test-fast demo

# torch first and pinned: an unpinned torch requirement would resolve to a multi-GB CUDA build
setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'

lint:
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# everything, slow tests included; each test gets at most 15 minutes
test: lint
	$(BIN)/python -m pytest -q --timeout 900

# the quick loop while developing: skips tests marked slow
test-fast:
	$(BIN)/python -m pytest -q --timeout 900 -m "not slow"

# the README's first command: set up, then BLIP's whole bootstrap loop on the synthetic world (CPU, Ray in-process)
demo: setup
	$(BIN)/capfilt bootstrap --config configs/bootstrap_demo.yaml
