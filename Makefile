# `make test` and `make serve` work on a fresh machine: they build .venv first.
# serve installs what serving needs only; test adds the dev extra (the reference libraries, clients, linters).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP  := $(VENV)/.installed-test

.PHONY: test serve venv clean

venv: $(TEST_STAMP)

$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: on this CPU-only box it is the local CPU wheel (the Dockerfile pins the same)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): $(SERVE_STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: $(TEST_STAMP)
	$(PY) -m pytest -q

serve: $(SERVE_STAMP)
	$(VENV)/bin/sd serve

clean:
	rm -rf $(VENV) .pytest_cache
