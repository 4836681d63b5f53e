"""What the Taylor gradient pass costs: wall time and peak memory of ``taylor_statistics`` on a run
config's calibration windows (default: SmolLM2-135M, the reduced CPU protocol's 128 x 512 windows).

    python benchmarks/taylor_cost.py [CONFIG] [--out FILE.json]

Peak memory on CPU is the process's peak RSS (``ru_maxrss``) after the pass minus before it (the model
and windows already loaded); on CUDA ``torch.cuda.max_memory_allocated`` around the pass. A timing:
run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from ppframework.adapters import get_adapter
from ppframework.api import load_config
from ppframework.calibration.orchestration import calibration_batches
from ppframework.calibration.taylor import taylor_statistics
from ppframework.models import load_model_from_config


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/ablation-broader-baselines.yaml")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    raw = __import__("yaml").safe_load(Path(args.config).read_text())
    base = dict(raw.get("base", raw))  # an ablation file's base, or a run config
    base.pop("method", None)
    cfg = load_config(base)
    model, tokenizer = load_model_from_config(cfg.model)
    adapter = get_adapter(model)
    batches = calibration_batches(cfg, tokenizer)
    device = next(model.parameters()).device
    before = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    taylor_statistics(model, adapter, batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    result = {
        "model": cfg.model.name,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype),
        "windows": sum(int(b.shape[0]) for b in batches),
        "seq_len": int(batches[0].shape[1]),
        "batch_size": int(batches[0].shape[0]),
        "seconds": round(seconds, 2),
        "peak_rss_mib_before": round(before, 1),
        "peak_rss_mib_after": round(_rss_mib(), 1),
        "peak_rss_increase_mib": round(_rss_mib() - before, 1),
    }
    if device.type == "cuda":
        result["cuda_peak_extra_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
