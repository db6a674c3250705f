# The README's commands: `make demo`, and `make setup test` (which .ci/run runs on a fresh clone).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup browser lint format test test-fast demo

# torch first and pinned: an unpinned torch requirement would resolve to a multi-GB CUDA build
setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'

# headless Chromium (Debian's package) renders the HTML report in tests/test_report.py; installing it needs root
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

lint:
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# everything, slow tests included; each test gets at most 15 minutes
test: browser lint
	$(BIN)/python -m pytest -q --timeout 900

# the quick loop while developing: skips tests marked slow
test-fast: browser
	$(BIN)/python -m pytest -q --timeout 900 -m "not slow"

# the README's first command: set up, then BLIP's whole bootstrap loop on the synthetic world (CPU, Ray in-process)
demo: setup
	$(BIN)/capfilt bootstrap --config configs/bootstrap_demo.yaml
