# One entry point for the checks; scripts/test.sh is what CI runs (set-up included).
VENV ?= .venv
PY := $(VENV)/bin

.PHONY: setup lint type test slow conformance bench all
all: lint type test

setup:
	bash scripts/setup.sh

lint: setup
	$(PY)/ruff check unionfs launcher tests perf

type: setup
	$(PY)/mypy unionfs launcher

test: setup
	$(PY)/pytest -q -p no:cacheprovider

slow: setup
	$(PY)/pytest -q -p no:cacheprovider --runslow

conformance: setup
	$(PY)/unionfs conformance --seed 1 --sequences 200 --steps 50

bench: setup
	$(PY)/python perf/bench.py
