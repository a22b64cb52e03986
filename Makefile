# Two commands for a fresh machine:  make run   and   make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: run test test-system-deps test-fast bench bench-startup bench-store clean

# Every install goes through the constraints file: the releases CI tested, on any machine.
CONSTRAINTS := deploy/constraints.txt

# The venv is (re)built when it is missing or pyproject.toml or the constraints changed.
$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	@touch $@

run: $(BIN)/.installed  ## train, evaluate and publish a classifier on the bundled digits
	$(BIN)/trainflow run --preset digits-quickstart

# Debian's PostgreSQL server (Prefect on PostgreSQL) and Chromium (the browser test); without them those
# two tests skip, saying why. Playwright drives the system Chromium: no browser download.
test-system-deps:
	@{ ls /usr/lib/postgresql/*/bin/initdb && test -x /usr/bin/chromium; } >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq \
	       && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql chromium; } \
	  || echo "note: could not install postgresql/chromium; their tests will be skipped"

# The tests cover both frameworks: they add the tensorflow extra to the venv.
$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev,tensorflow,timm,mlflow]'
	@touch $@

# The MLflow tracking server the tests start: full MLflow, in a venv of its own (see deploy/mlflow-server.txt).
MLFLOW_SERVER := $(VENV)/mlflow-server
$(MLFLOW_SERVER)/.installed: deploy/mlflow-server.txt
	@test -x $(MLFLOW_SERVER)/bin/python || $(PYTHON) -m venv $(MLFLOW_SERVER)
	$(MLFLOW_SERVER)/bin/pip install --quiet -r deploy/mlflow-server.txt
	@touch $@

# Two test processes: one runs every module that starts Ray or a server, in order; the other the rest
# (tests/conftest.py: NEEDS_NO_SERVER and its scheduler).
test: $(BIN)/.installed-test $(MLFLOW_SERVER)/.installed test-system-deps  ## the whole suite, slow and CIFAR-10 tests included
	$(BIN)/python -m pytest -v --durations=15 -n 2

test-fast: $(BIN)/.installed-test  ## the quick check (under 3 minutes): every test not marked slow
	$(BIN)/python -m pytest -m "not slow" --durations=10

bench: $(BIN)/.installed  ## training throughput vs ../shared/bench/baseline_torch.py, and through Ray Train with 1 and 2 workers, as JSON
	$(BIN)/python bench/train_throughput.py

bench-startup: $(BIN)/.installed  ## where a local run's time goes besides training (cold; run `trainflow up` first for warm)
	$(BIN)/python bench/startup.py --repeats 3

bench-store: $(BIN)/.installed  ## 50 MB round trip through S3 (local SeaweedFS) vs a folder, and the digits flow on each
	$(BIN)/python bench/store_roundtrip.py --flow

clean:
	rm -rf artifacts .pytest_cache
