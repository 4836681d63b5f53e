"""Speed benchmark: turn the pruning ratio into wall-clock savings.

Times, interleaved in one process after warm-up, the unmodified model, the pipeline at ratio 0,
Probe Pruning (``pp`` preset) and one static baseline at each ratio, and reports for each variant:
median forward time (whole model and decoder layers alone), ratio to dense, the FLOPs-implied ideal
ratio, the realisation ``(1 - measured ratio) / (1 - ideal ratio)``, PP's per-batch overhead by
stage as a share of the dense decoder time, tokens per second and peak memory. Writes
``speed.json`` and ``speed.md`` into ``--out``. See ``benchmarks/README.md``.

``--generation`` times ``model.generate`` instead (greedy, KV cache, a fixed number of new tokens):
prefill seconds and decode tokens per second, separately, at each ``--gen-batches`` size, for dense,
``pp`` and the static baselines, interleaved; with the decode step's kept-weight (bytes) ideal
speed-up and the share of it measured, and PP's per-generate overhead (its prefill against the
static baseline's at the same ratio).

Workloads (``--workload``):

* ``smollm2``: SmolLM2-135M-Instruct, offline (``ppframework.models.load_model("smollm2-135m")``);
  default CPU, float32, batch 8 x 512.
* ``smollm2-shape``: the same shapes with random weights (no model file needed).
* ``1b``: a LLaMA-shaped model with random weights, hidden 2048, 16 layers, 32 query heads,
  8 key/value heads (head_dim 64), MLP 8192, vocabulary 32000 (LLaMA-3.2-1B's shape with a
  LLaMA-2 vocabulary); default CPU float32, batch 2 x 512 (it fits a CPU run).
* ``7b``: LLaMA-2-7B's shape with random weights, hidden 4096, 32 layers, 32 heads (no GQA),
  MLP 11008, vocabulary 32000; default CUDA float16 at the paper's batch 20 x 1024.
* ``tiny``: the tiny test model (``llama-gqa``), batch 4 x 64, for smoke tests.

Random weights are drawn directly on the target device and dtype (built on the ``meta`` device,
then ``to_empty`` and filled with N(0, 0.02); norms 1). The calibration history comes from a few
random-token batches: it only has to exist for speed (pruning *decisions* on random data are not
meaningful, their *shapes* are what is timed).

This file is the command line only; the benchmark lives in the ``speedbench`` package beside it (one
module per concept, listed in ``speedbench/__init__.py``). The names below are re-exported for the
scripts and tests that import them from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # loaded by file path (tests) rather than run as a script
    sys.path.insert(0, _HERE)

from speedbench.cli import main, parse_args  # noqa: E402
from speedbench.costs import decode_weight_bytes, kv_cache_bytes, projection_params, reused_flops  # noqa: E402
from speedbench.forward import run_forward  # noqa: E402
from speedbench.forward_report import format_markdown, target_lines  # noqa: E402
from speedbench.generation import run_generation  # noqa: E402
from speedbench.generation_report import format_generation_markdown, generation_target_lines  # noqa: E402
from speedbench.methods import ablation_variants, method, statics, variant  # noqa: E402
from speedbench.stats import add_paired_overhead, paired_difference  # noqa: E402
from speedbench.workloads import (  # noqa: E402
    DEFAULTS,
    DTYPES,
    SHAPES,
    build_model,
    build_model_and_tokenizer,
    model_shape,
    random_llama,
)

__all__ = [
    "DEFAULTS",
    "DTYPES",
    "SHAPES",
    "ablation_variants",
    "add_paired_overhead",
    "build_model",
    "build_model_and_tokenizer",
    "decode_weight_bytes",
    "format_generation_markdown",
    "format_markdown",
    "generation_target_lines",
    "kv_cache_bytes",
    "main",
    "method",
    "model_shape",
    "paired_difference",
    "parse_args",
    "projection_params",
    "random_llama",
    "reused_flops",
    "run_forward",
    "run_generation",
    "statics",
    "target_lines",
    "variant",
]

if __name__ == "__main__":
    sys.exit(main())
