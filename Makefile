# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates and fills the local virtual environment .venv when it is missing or stale.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-all lint format bench catalogue clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# visdom (needed by adv-lib, a dev reference) is an sdist whose setup.py imports pkg_resources,
	# which setuptools 81 removed: build it with an older setuptools, outside build isolation
	$(BIN)/python -m pip install --quiet "setuptools<81" wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation visdom
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/advseg demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

catalogue: $(STAMP)  # after a model, attack, loss or defence changed: what the listings read
	$(BIN)/python -m advseg.cli.catalogue

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
