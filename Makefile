# Two entry points (see README): `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint bench-engine clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU path: pin torch so pip takes the CPU build, never the multi-GB CUDA one.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cluster serve

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check cluster tests
	$(VENV)/bin/ruff format --check cluster tests

bench-engine: $(STAMP)
	$(VENV)/bin/cluster bench engine --json --output bench-results/engine.json

clean:
	rm -rf $(VENV) bench-results
