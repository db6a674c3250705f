# The README's commands: `make demo`, and `make setup test` (which .ci/run runs on a fresh clone).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

TORCH := 2.13.0

.PHONY: setup lock browser lint format test test-fast demo gpu-wheels

# torch first and pinned: an unpinned torch requirement would resolve to a multi-GB CUDA build;
# everything else at the versions in constraints.txt (the set CI passed with; `make lock` regenerates it)
setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==$(TORCH)
	$(BIN)/pip install -c constraints.txt -e '.[dev]'

# upgrade the pins: resolve the newest versions pyproject.toml allows in a scratch venv, write them to
# constraints.txt (torch and capfilt itself left out); then `make setup test` and commit constraints.txt
lock:
	set -e; d=$$(mktemp -d); trap 'rm -rf "$$d"' EXIT; \
	$(PYTHON) -m venv "$$d"; \
	"$$d/bin/pip" install torch==$(TORCH); \
	"$$d/bin/pip" install -e '.[dev]'; \
	{ echo "# The versions a fresh \`make setup\` installs (pip install -c constraints.txt -e '.[dev]'): the set CI passed with."; \
	  echo "# torch is pinned in the Makefile (TORCH), capfilt itself is the editable install. Regenerate with \`make lock\`."; \
	  "$$d/bin/pip" freeze --exclude-editable | grep -v -i '^torch=='; } > "$$d/constraints.txt"; \
	mv "$$d/constraints.txt" constraints.txt
	@echo "wrote constraints.txt; now run: make setup test"

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
	$(BIN)/python -m pytest -q --timeout 900 --durations=10

# the quick loop while developing: skips tests marked slow
test-fast: browser
	$(BIN)/python -m pytest -q --timeout 900 -m "not slow"

# the README's first command: set up, then BLIP's whole bootstrap loop on the synthetic world (CPU, Ray in-process)
demo: setup
	$(BIN)/capfilt bootstrap --config configs/bootstrap_demo.yaml

# for bench/gpu_check.sh on a GPU machine that cannot reach a package registry (its image has torch, transformers,
# pyarrow, ...): the pure-Python packages it lacks, as wheels in .whl/ (git-ignored; carry the folder there)
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: -d .whl $$(grep -E '^(webdataset|braceexpand)==' constraints.txt)
