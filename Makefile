# Two entry points: `make up` (run everything locally) and `make test` (the suite).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test install lint typecheck bench checkov clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (Python >= 3.11)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/mnemos up

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check mnemos control_plane neuron_runtime registry loadtest launchers tests

typecheck: $(STAMP)
	$(BIN)/mypy mnemos control_plane neuron_runtime registry loadtest launchers

bench: $(STAMP)
	$(BIN)/python -m loadtest bench noop
	$(BIN)/python -m loadtest bench stream

# checkov in a virtual environment of its own: it pins boto3 and ships another `hcl2`,
# which would replace the project's (see infra/terraform/README.md).
checkov: $(STAMP)
	@test -x .venv-checkov/bin/checkov || { $(PY) -m venv .venv-checkov && .venv-checkov/bin/pip install --quiet checkov; }
	MNEMOS_CHECKOV=.venv-checkov/bin/checkov $(BIN)/python -m pytest -q tests/test_terraform.py

clean:
	rm -rf $(VENV) .venv-checkov .mnemos .pytest_cache
