# Quick start: `make demo` then `make test`. Both create .venv on first use; the demo installs only what it
# needs (no torch), `make test` adds the test and reference extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.demo-installed
TEST_STAMP := $(VENV)/.test-installed
JOBS ?= 2

.PHONY: demo test bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[demo]'
	touch $(DEMO_STAMP)

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[demo,test,reference,examples]'
	touch $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m jaxdiff.demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -q tests

# the documentation site (guides, notebooks, API reference) into site/; --strict fails on any warning
docs: $(TEST_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(TEST_STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache demo.png bench-quick site
