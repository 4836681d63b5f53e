#!/usr/bin/env bash
# The prepared GPU check (under 8 minutes on one H200): the test suite's CUDA-marked tests, then
# the speed benchmark's workload (b) -- a LLaMA-2-7B-shaped model with random weights, fp16, at
# the paper's batch 20 x 1024 -- and its table. Installs nothing.
#
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
#
# PYTHON: an interpreter with torch (CUDA), transformers, pytest, hypothesis and this package
# importable (default: python). RESULTS_DIR: where speed.json / speed.md go (default: $OUT/7b-cuda
# when $OUT is set, else benchmarks/results/7b-cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS_DIR=${RESULTS_DIR:-${OUT:-benchmarks/results}/7b-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}")
PY

echo "== CUDA-marked tests"
timeout 150 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_fast_paths.py tests/test_runtime_memory.py

echo "== workload (b): 7B-shaped fp16, batch 20 x 1024"
mkdir -p "$RESULTS_DIR"
timeout 300 "$PYTHON" benchmarks/speed.py --workload 7b --device cuda --dtype float16 \
    --batch 20 --seq 1024 --ratios 0.2 0.4 --repeats 5 --out "$RESULTS_DIR" > "$RESULTS_DIR/stdout.txt"

echo "== table ($RESULTS_DIR/speed.md)"
cat "$RESULTS_DIR/speed.md"
