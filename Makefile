# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv on first
# use and re-installs only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench coverage clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/localitylab demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# Which timm models the probes read: docs/model-coverage.md (and .csv). Re-run after upgrading timm.
coverage: $(STAMP)
	$(BIN)/python scripts/model_coverage.py

clean:
	rm -rf $(VENV) .pytest_cache
