# roadpulse: `make demo` runs the embedded pipeline with its live map; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/roadpulse map info helsinki

# The suite starts what it needs itself (a Kafka-protocol broker, chromium when installed).
test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.network

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
