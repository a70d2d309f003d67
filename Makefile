# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install-gpu gpu-check gpu-bundle gpu-check-offline lint bench clean-venv

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

# On a CUDA machine with registry access: the gpu extra (xformers), then exactly one faiss build: faiss-cpu (a base
# dependency) is removed before the GPU build goes in, since both ship the same `faiss` module and clash.
install-gpu: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,demo,gpu]"
	$(PY) -m pip uninstall -y -q faiss-cpu
	$(PY) -m pip install -q "faiss-gpu-cu12>=1.8,<2"
	$(PY) -c "from data_pipeline.core.faiss_gpu import check_single_faiss as c; print('faiss build:', c())"

# The gpu-marked tests (skipped elsewhere) and the GPU benches.
gpu-check: install-gpu
	$(PY) -c "import torch; assert torch.cuda.is_available(), 'gpu-check needs a CUDA device'"
	$(PY) -m pytest -q -m gpu
	$(PY) bench/backbone.py
	$(PY) bench/train_step.py
	$(PY) bench/scaling.py --gpu
	$(PY) bench/faiss_gpu.py

# For a GPU machine with no registry: gather the wheels it lacks (Python 3.12, manylinux x86_64, <= 64 MiB) into
# .gpu_bundle/, then carry .gpu_bundle/ there and run `scripts/gpu_check.sh` (what is left out: manifest.json).
gpu-bundle: $(STAMP)
	$(PY) scripts/gpu_bundle.py --out .gpu_bundle

# Here, without a GPU: the offline install into a fresh Python 3.12 venv and the script's CPU-safe parts.
gpu-check-offline: gpu-bundle
	bash scripts/gpu_bundle_dryrun.sh

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/backbone.py

clean-venv:
	rm -rf $(VENV)
