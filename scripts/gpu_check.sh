#!/usr/bin/env bash
# The GPU check on a machine with no package registry: install the wheels gathered by `make gpu-bundle` (carried in
# .gpu_bundle/) offline into this machine's python, then run the gpu-marked tests and the GPU benches (train-step
# MFU with its per-phase profiler breakdown for ViT-S/14 and ViT-L/14, each with packed vs separate multi-crop timed
# alternately; the backbone's packed vs separate multi-crop under SDPA and xformers; faiss GPU vs CPU) within about
# 8 minutes, writing every log and summary.md under $OUT.
#
# Usage: scripts/gpu_check.sh [--no-cuda] [--no-install]
#   --no-cuda     skip everything that needs a CUDA device: the benches run as CPU smoke runs (--quick) and the
#                 gpu-marked tests are collected and skipped; for checking this script on a machine without a GPU.
#   --no-install  use the python as it is (no pip install at all).
# Environment: PYTHON (default python3), BUNDLE (default .gpu_bundle), OUT (default ./gpu_check_out),
#   BUDGET_S (default 470: steps that would start later are skipped, and each step's timeout is cut to fit).
set -uo pipefail
cd "$(dirname "$0")/.."

NO_CUDA=0
INSTALL=1
for arg in "$@"; do
  case "$arg" in
    --no-cuda) NO_CUDA=1 ;;
    --no-install) INSTALL=0 ;;
    *) echo "unknown argument $arg (use --no-cuda, --no-install)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-.gpu_bundle}
OUT=${OUT:-$PWD/gpu_check_out}
BUDGET_S=${BUDGET_S:-470}
export PY BUNDLE
mkdir -p "$OUT"
SUMMARY=$OUT/summary.md
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # there is no registry to reach: never wait for one
T0=$(date +%s)
FAILED=0

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "mode: $([ $NO_CUDA = 1 ] && echo 'no CUDA (smoke run)' || echo CUDA); python: $($PY --version 2>&1)"
  echo
  echo "| step | exit | seconds |"
  echo "|---|---|---|"
} > "$SUMMARY"

# step NAME LIMIT_S COMMAND...: run with a timeout cut to the remaining budget, log to $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - T0)))
  if [ "$left" -lt 15 ]; then
    echo "| $name | skipped: time budget spent | 0 |" >> "$SUMMARY"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start rc
  start=$(date +%s)
  echo ">> $name (limit ${limit}s)"
  if declare -F "$1" > /dev/null; then  # a function of this script: timeout needs a process to run it in
    export -f "$1"
    set -- bash -c "$1"
  fi
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [ $rc = 0 ] || FAILED=1
  echo "| $name | $rc$([ $rc = 124 ] && echo ' (timeout)') | $(($(date +%s) - start)) |" >> "$SUMMARY"
  tail -n 3 "$OUT/$name.log"
}

install() {
  "$PY" -m pip install --no-index --find-links "$BUNDLE/wheels" -r "$BUNDLE/requirements.txt" || return 1
  # Extensions built against PyTorch go in without dependencies: pip must never touch the machine's torch.
  if ls "$BUNDLE"/wheels/xformers-*.whl > /dev/null 2>&1; then
    "$PY" -m pip install --no-index --no-deps --find-links "$BUNDLE/wheels" xformers || return 1
  fi
}

environment() {
  "$PY" - <<'EOF'
import importlib.util
import json

import torch

from data_pipeline.core import faiss_gpu

info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "faiss_build": faiss_gpu.check_single_faiss(), "faiss_gpus": faiss_gpu.gpu_count(),
        "xformers": importlib.util.find_spec("xformers") is not None}
for name in ("omegaconf", "submitit", "webdataset", "imagehash", "fvcore", "faiss", "fsspec", "aiohttp"):
    info[name] = importlib.util.find_spec(name) is not None
print(json.dumps(info, indent=1))
missing = [k for k, v in info.items() if v is False and k not in ("cuda", "xformers")]
if missing:
    raise SystemExit(f"missing after install: {missing}")
EOF
}

if [ $INSTALL = 1 ]; then
  [ -f "$BUNDLE/requirements.txt" ] || { echo "no $BUNDLE/requirements.txt: run make gpu-bundle first" >&2; exit 2; }
  step install 120 install
fi
step environment 60 environment

if [ $NO_CUDA = 1 ]; then
  step pytest_gpu 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests
  step bench_train_step_quick 240 "$PY" bench/train_step.py --quick --device cpu --precisions fp32 \
    --multicrop packed,separate
  step bench_faiss_smoke 120 "$PY" bench/faiss_gpu.py --n 20000 --d 64 --queries 2000 --centroids 200 --threads 2
else
  step pytest_gpu 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests
  step bench_train_step_vits 120 "$PY" bench/train_step.py --device cuda --precisions bf16 --batch 64 --iters 5 \
    --multicrop packed,separate
  step bench_train_step_vitl 150 "$PY" bench/train_step.py --device cuda --arch vit_large --precisions bf16 \
    --batch 32 --iters 5 --multicrop packed,separate
  step bench_backbone_sdpa 60 env DINOV2_ATTN_BACKEND=sdpa "$PY" bench/backbone.py --device cuda
  step bench_backbone_xformers 60 env DINOV2_ATTN_BACKEND=xformers "$PY" bench/backbone.py --device cuda
  step bench_faiss 90 "$PY" bench/faiss_gpu.py --n 1000000 --d 256 --queries 50000 --centroids 10000
fi

{
  echo
  echo "total: $(($(date +%s) - T0)) s"
  if [ -f "$BUNDLE/manifest.json" ]; then
    echo
    echo "## Bundle (left out, and why)"
    echo
    echo '```'
    "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print(m['total_mib'], 'MiB carried'); \
[print(k + ':', v) for k, v in m['left_out'].items()]" "$BUNDLE/manifest.json"
    echo '```'
  fi
  for log in "$OUT"/*.log; do
    echo
    echo "## $(basename "$log" .log)"
    echo
    echo '```'
    tail -n 30 "$log"
    echo '```'
  done
} >> "$SUMMARY"
echo "summary: $SUMMARY"
exit $FAILED
