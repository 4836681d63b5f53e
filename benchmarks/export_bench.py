"""Export on SmolLM2-135M: file size, load time and decode tokens/s of the exported model against the
pipeline-attached one and dense (issue 30).

For Wanda-sp and static PPsp at 20% and 40%, uniform and adaptive allocation (``skip_layers: []``,
so a uniform decision can be a standard checkpoint): export into a temporary folder, report the
format, the weight bytes against the original's, the median ``load_pruned`` time, and (unless
``--no-timing``) greedy decode tokens/s of dense / attached / exported, interleaved round by round so
drift hits all three alike. Run it on a quiet machine::

    .venv/bin/python benchmarks/export_bench.py --rounds 5 --new-tokens 64 --out benchmarks/results/export
    .venv/bin/python benchmarks/export_bench.py --no-timing   # sizes and load times only
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import ppframework as ppf

METHODS = [
    (preset, allocation, ratio)
    for preset in ("wanda-sp", "static-ppsp")
    for allocation in ("uniform", "adaptive")
    for ratio in (0.2, 0.4)
]


def _config(model: str, samples: int) -> ppf.RunConfig:
    methods = [
        {
            "preset": preset,
            "name": f"{preset}-{allocation}",
            "pruning": {"ratio": ratio, "skip_layers": []},
            "strategies": {"allocate": {"name": allocation}},
        }
        for preset, allocation, ratio in METHODS
    ]
    return ppf.load_config(
        {
            "model": {"name": model},
            "calibration": {"dataset": "c4", "split": "validation", "n_samples": samples, "batch_size": 8},
            "methods": methods,
        }
    )


def _decode_seconds(model: Any, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load-repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--no-timing", action="store_true", help="sizes and load times only")
    parser.add_argument("--out", help="folder for export_bench.json")
    args = parser.parse_args()

    cfg = _config(args.model, args.calibration_samples)
    model, tokenizer = ppf.load_model_from_config(cfg.model)
    source_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(100, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, method in enumerate(cfg.methods):
            pipe = ppf.build_pipeline(model, cfg, method_index=index, tokenizer=tokenizer, progress=False)
            folder = Path(tmp) / f"{index}"
            result = ppf.export_pruned(pipe, folder, tokenizer=tokenizer)
            loads = []
            for _ in range(args.load_repeats):
                start = time.perf_counter()
                exported, _ = ppf.load_pruned(folder)
                loads.append(time.perf_counter() - start)
            row: dict[str, Any] = {
                "method": method.label,
                "allocation": method.strategies.allocate.name,
                "format": result.format,
                "reason": result.reason,
                "weight_bytes": result.bytes,
                "source_bytes": source_bytes,
                "size_fraction": result.bytes / source_bytes,
                "load_s_median": statistics.median(loads),
            }
            if not args.no_timing:
                times: dict[str, list[float]] = {"dense": [], "attached": [], "exported": []}
                _decode_seconds(exported, prompt, 4)  # warm-up
                for _ in range(args.rounds):
                    times["dense"].append(_decode_seconds(model, prompt, args.new_tokens))
                    with pipe:
                        times["attached"].append(_decode_seconds(model, prompt, args.new_tokens))
                    times["exported"].append(_decode_seconds(exported, prompt, args.new_tokens))
                for name, values in times.items():
                    row[f"{name}_tokens_per_s"] = args.new_tokens / statistics.median(values)
                row["exported_vs_attached"] = row["exported_tokens_per_s"] / row["attached_tokens_per_s"]
            pipe.release()
            rows.append(row)
            print(json.dumps(row))
    report = {"settings": vars(args), "device": "cpu", "threads": torch.get_num_threads(), "rows": rows}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "export_bench.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
