# moecache: every target builds what it needs in a local virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine keeps a CPU build of torch 2.13.0 on disk; elsewhere use e.g. `make TORCH_PIN=torch`.
TORCH_PIN ?= torch==2.13.0
TRACE ?= traces/sample-synthetic.parquet

CORE := $(VENV)/.core-installed
FULL := $(VENV)/.full-installed

.PHONY: env run test lint bench clean

env: $(FULL)

$(CORE): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e .
	touch $@

$(FULL): $(CORE)
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e '.[capture,dev]'
	touch $@

run: $(CORE)
	$(BIN)/moecache info $(TRACE)
	$(BIN)/moecache replay $(TRACE) --policy lru --capacity 16 --bandwidth 4GB/s

test: $(FULL)
	$(BIN)/python -m pytest

lint: $(FULL)
	$(BIN)/ruff check moecache policies tests benchmarks experiments

bench: $(FULL)
	$(BIN)/python benchmarks/bench_replay.py

clean:
	rm -rf $(VENV) build *.egg-info
