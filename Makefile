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
	@# The fused attention-distance kernel, compiled for this machine now rather than in the first probe.
	$(BIN)/python -c 'from localitylab.attention import fused; raise SystemExit(not fused.load())' || echo "the fused attention kernel did not build: probes use the torch path"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/localitylab demo

# Two workers for the two cores (most tests run one thread of Python). A test file stays on
# one worker, which builds its module fixtures once; the shared trained runs are trained once
# for both (tests/conftest.py). OMP_WAIT_POLICY=PASSIVE: an idle OpenMP thread must not spin
# on a core the other worker needs. (Not --dist loadgroup: pytest-xdist 3.8's groups have no
# effect under pytest 9, whose test ids it can no longer suffix.)
test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# Which timm models the probes read: docs/model-coverage.md (and .csv). Re-run after upgrading timm.
coverage: $(STAMP)
	$(BIN)/python scripts/model_coverage.py

clean:
	rm -rf $(VENV) .pytest_cache
