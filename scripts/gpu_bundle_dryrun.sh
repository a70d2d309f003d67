#!/usr/bin/env bash
# The offline GPU check rehearsed here, without a GPU:
#  1. a fresh venv of the bundle's Python (3.12 by default; PY312 names another interpreter) installs the bundle with
#     pip allowed no registry (--no-index), exactly as scripts/gpu_check.sh does on the GPU machine. What that
#     machine already has (numpy, Pillow, PyYAML, tqdm, scipy, ...) comes from a second folder downloaded here and
#     never carried; PyTorch is not installed, so xformers goes in --no-deps, as there.
#  2. the bundled modules import and exactly one faiss build is installed;
#  3. scripts/gpu_check.sh --no-cuda --no-install runs with the project's own venv (the CPU-safe parts).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-.gpu_bundle}
PROJECT_PY=${PROJECT_PY:-.venv/bin/python}
want=$(python3 -c "import json; print(json.load(open('$BUNDLE/manifest.json'))['python'])")
PY312=${PY312:-}
if [ -z "$PY312" ]; then
  if python"$want" -c pass 2> /dev/null; then
    PY312=python$want
  elif command -v pyenv > /dev/null; then
    PY312=$(ls "$(pyenv root)"/versions/"$want"*/bin/python"$want" 2> /dev/null | tail -n 1)
  fi
fi
[ -n "$PY312" ] || { echo "no python$want here: set PY312, or build a bundle for this Python (--python-version)"; exit 2; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY312" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
# What the GPU machine already has (never carried there).
"$VPY" -m pip download -q --only-binary=:all: -d "$WORK/machine" numpy pillow pyyaml tqdm scipy packaging \
  typing_extensions cloudpickle portalocker tabulate
echo ">> offline install into a fresh $("$VPY" --version) venv"
"$VPY" -m pip install -q --no-index --find-links "$BUNDLE/wheels" --find-links "$WORK/machine" \
  -r "$BUNDLE/requirements.txt"
if ls "$BUNDLE"/wheels/xformers-*.whl > /dev/null 2>&1; then
  "$VPY" -m pip install -q --no-index --no-deps --find-links "$BUNDLE/wheels" xformers
fi
PYTHONPATH=$PWD "$VPY" -c "
import braceexpand, faiss, fvcore, imagehash, iopath, omegaconf, pywt, submitit, termcolor, webdataset, yacs
from data_pipeline.core.faiss_gpu import check_single_faiss
print('offline install OK: faiss', faiss.__version__, 'from', check_single_faiss(), '| omegaconf', omegaconf.__version__)
"
echo ">> scripts/gpu_check.sh --no-cuda --no-install with $PROJECT_PY"
PYTHON=$PROJECT_PY OUT=${OUT:-$PWD/gpu_check_out} bash scripts/gpu_check.sh --no-cuda --no-install
