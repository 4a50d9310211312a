# roadpulse: `make demo` runs the embedded pipeline with its live map; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: venv demo test test-deps bench clean

# Two stamps: the demo needs only the package, the tests also need the [test] extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --no-compile -e '.[test]'
	touch $(TEST_STAMP)

venv: $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/roadpulse demo

# The suite starts what it needs itself (a Kafka-protocol broker, chromium when installed).
test: venv test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# System packages some tests use when present; a failure here only makes those tests skip.
test-deps:
	@command -v chromium >/dev/null 2>&1 || apt-get install -y chromium >/dev/null 2>&1 \
	  || (apt-get update >/dev/null 2>&1 && apt-get install -y chromium >/dev/null 2>&1) \
	  || echo "test-deps: chromium not installed (needs root + Debian apt); the browser test will skip"
	@command -v prometheus >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 \
	  || (apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1) \
	  || echo "test-deps: prometheus not installed (needs root + Debian apt); the Prometheus tests will skip"

bench: venv
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.network

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
