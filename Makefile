# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all gpu-check lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

# On a CUDA machine: the gpu extra (xformers, faiss-gpu), the gpu-marked tests (skipped elsewhere), the GPU benches.
gpu-check: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,demo,gpu]"
	$(PY) -c "import torch; assert torch.cuda.is_available(), 'gpu-check needs a CUDA device'"
	$(PY) -m pytest -q -m gpu
	$(PY) bench/backbone.py
	$(PY) bench/train_step.py
	$(PY) bench/scaling.py --gpu

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/backbone.py

clean-venv:
	rm -rf $(VENV)
