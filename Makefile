# The two commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all lint format venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/diagnostics demo

# Default run: everything except `gpu` tests (see pytest addopts in pyproject.toml).
test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check diagnostics tests benchmarks
	$(BIN)/ruff format --check diagnostics tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format diagnostics tests benchmarks
	$(BIN)/ruff check --fix diagnostics tests benchmarks

clean:
	rm -rf $(VENV) .diagnostics .pytest_cache .ruff_cache build *.egg-info
