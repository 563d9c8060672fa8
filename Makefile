# `make demo` and `make test` set everything up on a fresh machine: a .venv with the package
# installed against constraints.txt (the exact versions CI has tested).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint format clean

install: $(STAMP)

# --no-compile: Python compiles what it imports (a first import writes its .pyc); compiling every file of
# ray, torch and the rest at install took a minute of make test's budget.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-compile -c constraints.txt -e '.[test,flower]'
	touch $@

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --config configs/tiny.py --workdir runs/demo --fresh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Test files are spread over TEST_WORKERS processes (pytest-xdist; a file's tests stay together, so
# its module fixtures are built once): on 2 cores most tests wait on compiles, I/O and subprocesses.
# Files go out in collection order (tests/conftest.py: the SuperLink file, then most tests first).
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
