# otel-subflow: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: help venv demo test lint typecheck unit e2e bench bench-scaling stack binaries redis-server clean

help:
	@echo "make demo    - reproduce and diagnose a missing-state incident (sets itself up)"
	@echo "make test    - lint, type-check and run every test (needs redis-server, Go for e2e)"
	@echo "make bench   - overhead benchmark (ratios measured in one run)"
	@echo "make bench-scaling - journal, watcher, analysis and collector per unit of load (docs/scaling.md)"
	@echo "make stack   - run collector + Jaeger + Prometheus locally (no Docker)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# Debian's redis-server when none is on PATH (needs root or sudo).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server from Debian's packages"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

demo: venv redis-server
	$(BIN)/otel-subflow demo $(DEMO_ARGS)

lint: venv
	$(BIN)/ruff check otel_subflow tests bench

typecheck: venv
	$(BIN)/mypy

binaries:
	scripts/build_binaries.sh all

unit: venv redis-server
	$(BIN)/python -m pytest -q -m "not e2e" $(PYTEST_ARGS)

e2e: venv redis-server binaries
	$(BIN)/python -m pytest -q -m e2e $(PYTEST_ARGS)

# The README's test command: lint, types, then every test (the end-to-end tier included).
test: venv redis-server binaries lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: venv redis-server
	$(BIN)/python bench/overhead.py $(BENCH_ARGS)

# docs/scaling.md's figures: each subcommand alone is `PYTHONPATH=. python bench/scaling.py journal` etc.
bench-scaling: venv redis-server binaries
	PYTHONPATH=. $(BIN)/python bench/scaling.py all $(BENCH_ARGS)

stack: venv binaries
	$(BIN)/python -m otel_subflow.stack $(STACK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
