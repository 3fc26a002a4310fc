# Two entry points for a fresh clone with only Python 3.11 and make:
#   make demo   creates .venv, installs varshift, runs the main job
#   make test   creates .venv with the test dependencies, runs ruff, mypy and pytest
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   ?= simulate --rate 0.2

.PHONY: demo test lint typecheck pytest bench reports baseline clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e . --group test
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	$(BIN)/varshift $(DEMO)

lint: $(VENV)/.test
	$(BIN)/ruff check varshift tests $(wildcard bench)
	$(BIN)/ruff format --check varshift tests $(wildcard bench)

typecheck: $(VENV)/.test
	$(BIN)/mypy

pytest: $(VENV)/.test
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

bench: $(VENV)/.test
	$(BIN)/python bench/run.py

# Debian's chromium for tests/test_html_browser.py (skipped without it); needs root.
browser:
	command -v chromium >/dev/null || { apt-get update && apt-get install -y chromium; }

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
