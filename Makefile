# moecache: every target builds what it needs in a local virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine keeps a CPU build of torch 2.13.0 on disk; elsewhere use e.g. `make TORCH_PIN=torch`.
TORCH_PIN ?= torch==2.13.0

include experiments/config.mk

CORE := $(VENV)/.core-installed
FULL := $(VENV)/.full-installed
GGUF := $(VENV)/.gguf-installed
# llama-cpp-python for GGUF capture; keep in step with the gguf extra in setup.cfg
LLAMA_CPP_PIN ?= 0.3.36
GGUF_SRC := $(VENV)/gguf-src
GGUF_SDIST := $(GGUF_SRC)/llama_cpp_python-$(LLAMA_CPP_PIN).tar.gz
MC := $(BIN)/moecache

.PHONY: env run test lint bench bench-scale bench-capture sweep plots compare pipeline sample-traces toy-model \
	remoe-experiment clean clean-cache

env: $(FULL) $(GGUF)

$(CORE): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e .
	touch $@

$(FULL): $(CORE)
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e '.[capture,dev]'
	touch $@

# llama-cpp-python's source distribution, kept: it carries llama.cpp's converter
# (vendor/llama.cpp/convert_hf_to_gguf.py), which the GGUF tests run offline.
$(GGUF_SDIST): | $(CORE)
	mkdir -p $(GGUF_SRC)
	$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PIN) -d $(GGUF_SRC)

# Built from that source once per venv (about 6 min on 2 cores; skipped while that
# version is installed: pip would rebuild a local archive every time).
$(GGUF): $(FULL) $(GGUF_SDIST)
	tar xzf $(GGUF_SDIST) -C $(GGUF_SRC) \
	    llama_cpp_python-$(LLAMA_CPP_PIN)/vendor/llama.cpp/convert_hf_to_gguf.py \
	    llama_cpp_python-$(LLAMA_CPP_PIN)/vendor/llama.cpp/conversion \
	    llama_cpp_python-$(LLAMA_CPP_PIN)/vendor/llama.cpp/gguf-py
	$(BIN)/python -c "import importlib.metadata as m, sys; \
	    sys.exit(m.version('llama_cpp_python') != '$(LLAMA_CPP_PIN)')" 2>/dev/null || \
	    CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(BIN)/pip install -q $(GGUF_SDIST)
	$(BIN)/pip install -q -e '.[capture,dev,gguf]'
	touch $@

# The main job on the shipped traces: describe, replay, compare baseline with ReMoE-like routing.
run: $(CORE)
	$(MC) info $(BASE_TRACE)
	@echo
	$(MC) replay $(BASE_TRACE) --policy lru --capacity 8 --bandwidth $(BANDWIDTH)
	@echo
	$(MC) compare $(BASE_TRACE) $(REMOE_TRACE) --capacity $(COMPARE_CAPACITIES) \
	    --bandwidth $(COMPARE_BANDWIDTHS) --model $(MODEL) --dtype $(DTYPE) --hardware $(HARDWARE)

test: $(FULL) $(GGUF)
	$(BIN)/python -m pytest

lint: $(FULL)
	$(BIN)/ruff check moecache policies tests benchmarks experiments

bench: $(FULL)
	$(BIN)/pip install --quiet --no-deps bigrig==0.9.1  # compared with, for the benchmark only
	$(BIN)/python benchmarks/bench_replay.py

bench-scale: $(FULL)
	$(BIN)/python benchmarks/bench_scale.py

bench-capture: $(FULL) $(GGUF)
	$(BIN)/python benchmarks/bench_capture.py

# -- experiments (settings in experiments/config.mk) -----------------------------------

sweep: $(CORE)
	$(MC) sweep $(BASE_TRACE) $(REMOE_TRACE) --policies $(POLICIES) --scopes $(SCOPES) \
	    --capacities $(CAPACITIES) --bandwidth $(BANDWIDTH) --out $(RESULTS)/sweep.parquet --resume

plots: $(CORE)
	$(MC) plot $(RESULTS)/sweep.parquet --out $(RESULTS)/figures --bootstrap $(BOOTSTRAP) --force

compare: $(CORE)
	@mkdir -p $(RESULTS)
	$(MC) compare $(BASE_TRACE) $(REMOE_TRACE) --capacity $(COMPARE_CAPACITIES) \
	    --bandwidth $(COMPARE_BANDWIDTHS) --model $(MODEL) --dtype $(DTYPE) --hardware $(HARDWARE) \
	    --out $(RESULTS)/compare.csv --force | tee $(RESULTS)/compare.txt

# Whole pipeline on the shipped sample traces: sweep, plots, comparison table.
pipeline: sweep plots compare

# Rebuild the shipped synthetic pair (deterministic).
sample-traces: $(CORE)
	$(MC) synth --out $(SAMPLE_TRACE) --layers 8 --experts 64 --top-k 8 \
	    --tokens 4096 --sequences 4 --stickiness 0.5 --skew 0.8 --seed 0 --logits --force
	$(MC) reroute $(SAMPLE_TRACE) --out $(REROUTED_TRACE) \
	    $(REROUTE_ARGS) --force

# -- ReMoE on a model trained here (issue 5) ----------------------------------------------
TOY_MODEL ?= models/toy-moe
TOY_ARGS ?=
REMOE_ARGS ?=
# each trains its toy model (experiments/toy_model.py --arch) if missing
REMOE_ARCHS ?= olmoe qwen2_moe deepseek_v3

# Train the toy OLMoE-style MoE from scratch on CPU (stdlib sources; ~2-7 min on 2 cores).
toy-model: $(FULL)
	$(BIN)/python experiments/toy_model.py --out $(TOY_MODEL) --force $(TOY_ARGS)

# ReMoE router fine-tuning of the toy models (three architectures): sweeps, traces, compare/sweep/plots.
remoe-experiment: $(FULL)
	for arch in $(REMOE_ARCHS); do \
	    $(BIN)/python experiments/remoe_experiment.py --arch $$arch --force $(REMOE_ARGS) || exit 1; done

clean: clean-cache
	rm -rf $(VENV) build *.egg-info

# numba's cached kernels (a cache does not notice edits to the kernels it calls).
clean-cache:
	find moecache policies -name '*.nb[ci]' -delete
