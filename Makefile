# Two entry points (see README): `make demo` runs the embedded default sweep, `make test` the tests.
# Both build .venv from nothing when it is missing or older than pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

# The tests run on every core (pytest-xdist); the SLURM tests share one worker (they share one cluster).
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadgroup
# The inner loop: no slow test, no process, notebook, SLURM or GPU test (tests/conftest.py says what each tier is).
FAST := not slow and not process and not notebook and not slurm and not gpu

.PHONY: venv demo test test-fast lint clean-venv

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m harness.sweep -m sweeps=demo

test: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(PYTEST)

test-fast: venv
	HARNESS_TEST_TIER=fast $(PYTEST) -m "$(FAST)"

clean-venv:
	rm -rf $(VENV)
