# Two entry points for a fresh clone with only Python 3.11 and make:
#   make demo   creates .venv, installs varshift, runs the main job
#   make test   creates .venv with the test dependencies, runs ruff, mypy and pytest
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   ?= simulate --rate 0.2

.PHONY: demo test test-min lint typecheck pytest regression fuzz bench reports baseline clean browser

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
	$(BIN)/lint-imports --no-cache

typecheck: $(VENV)/.test
	$(BIN)/mypy

pytest: $(VENV)/.test
	$(BIN)/python -m pytest -q

# The report suite regenerated and checked against the committed baseline: fails (exit 1) when a
# scenario's numbers regress; readable reports land in build/check/ (Markdown and JUnit).
CHECK_DIR := build/check
regression: $(VENV)/.test
	$(BIN)/varshift suite --report-dir $(CHECK_DIR) --force --quiet
	$(BIN)/varshift check $(CHECK_DIR)/suite.json --baseline reports/baseline.json \
		--junit $(CHECK_DIR)/check.xml --markdown $(CHECK_DIR)/check.md --force --quiet

test: lint typecheck pytest regression

# The hostile-input and crash-safety suites at length (hypothesis profile "fuzz": ~1,500
# command lines, a dozen kill -9 runs, several concurrent writers); `make test` runs them short.
fuzz: $(VENV)/.test
	VARSHIFT_HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q tests/test_hostile.py tests/test_crash.py

# The declared minimum versions, installed exactly (a constraints file generated from every
# `name>=X` of pyproject's dependencies and extras) in a separate venv, then the test suite.
# torch stays at the test group's 2.13.0 (a range reaching past 2.14.1 pulls a CUDA build).
# The test group's other frameworks are left out (their conformance tests skip): tf-keras
# pulls tensorflow 2.21 (h5py >= 3.11) and jax/flax/optax need numpy >= 2.0, floors of those
# packages, not of varshift, which would make the declared minimums uninstallable.
MIN_VENV := .venv-min
MIN_SKIP := tf-keras jax flax optax
test-min:
	rm -rf $(MIN_VENV) && $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --upgrade "pip>=25.1"
	$(MIN_VENV)/bin/python -c "import re, tomllib; t = tomllib.load(open('pyproject.toml', 'rb')); p = t['project']; \
	  reqs = p['dependencies'] + [r for v in p['optional-dependencies'].values() for r in v]; \
	  mins = [re.sub(r'\[.*\]', '', r).replace('>=', '==').split(',')[0] for r in reqs if '>=' in r and 'torch' not in r]; \
	  open('$(MIN_VENV)/min.txt', 'w').write('\n'.join(mins) + '\n'); \
	  test = [r for r in t['dependency-groups']['test'] if re.split(r'[<>=!~\[ ]', r)[0] not in '$(MIN_SKIP)'.split()]; \
	  open('$(MIN_VENV)/test.txt', 'w').write('\n'.join(test) + '\n')"
	$(MIN_VENV)/bin/python -m pip install --quiet -c $(MIN_VENV)/min.txt -e ".[plot,keras,safetensors,dask]" -r $(MIN_VENV)/test.txt
	$(MIN_VENV)/bin/python -m pip freeze | grep -iE '^(numpy|typer|rich|pandas|tabulate|h5py|safetensors|matplotlib|dask|torch)=='
	# typer 0.16.0 (the minimum until issue 14) imports click.utils.get_*_stream, which click >= 8.2 deprecates: a
	# warning the suite's filterwarnings=error would turn into collection errors. matplotlib
	# 3.8.0 calls pyparsing's camelCase names (parseString), which pyparsing 3.3 deprecates:
	# a warning of matplotlib's, harmless to users, that would fail every figure test.
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		-W "ignore:'click.utils.get_:DeprecationWarning" \
		-W "ignore::pyparsing.warnings.PyparsingDeprecationWarning"

# The suite under reports/ (CSV, Markdown, JSON).
reports: $(VENV)/.core
	$(BIN)/varshift suite --report-dir reports --force

# Update the committed baseline on purpose: review `git diff reports/baseline.json`, then commit.
baseline: reports
	cp reports/suite.json reports/baseline.json

bench: $(VENV)/.test
	$(BIN)/python bench/run.py
	if $(BIN)/python -c 'import torch' 2>/dev/null; then \
		$(BIN)/python bench/bench_torch.py --output bench/results_torch.md; \
	else echo 'bench_torch: torch not installed, skipped'; fi
	if $(BIN)/python -c 'import distributed' 2>/dev/null; then \
		$(BIN)/python bench/bench_executor.py --out bench/results_executor.md; \
	else echo 'bench_executor: dask.distributed not installed, skipped'; fi

# Debian's chromium for tests/test_html_browser.py (skipped without it); needs root.
browser:
	command -v chromium >/dev/null || { apt-get update && apt-get install -y chromium; }

clean:
	rm -rf $(VENV) $(MIN_VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
