# The two commands of the README: `make demo` and `make test`.  Each sets up .venv by itself (pinned versions).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools==84.2.1
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: venv  ## federated semi-supervised demo: 3 synthetic sites in POC mode (real FLARE processes)
	$(BIN)/python poc/run_demo.py $(DEMO_ARGS)

# pytest's exit 5 ("no tests selected", e.g. by a PYTEST_ARGS filter) counts as success; any failure fails.
test: venv  ## the whole test suite (what CI runs): two workers, then the POC tests alone
	@status=0; \
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not poc" --durations=10 $(PYTEST_ARGS) || [ $$? -eq 5 ] || status=1; \
	$(BIN)/python -m pytest -q -m poc --durations=5 $(PYTEST_ARGS) || [ $$? -eq 5 ] || status=1; \
	exit $$status

test-fast: venv  ## unit tests only, no FLARE processes
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: venv  ## benchmark suite: ratios against baselines run side by side (BENCH_ARGS="--quick" for minutes)
	$(BIN)/python bench/suite.py $(BENCH_ARGS)

clean:
	rm -rf .work build *.egg-info custom/*.egg-info
