"""Perplexity of a model split over devices (``model.device_map``) against the same model on one device.

Loads the run config's model twice: on one device, then with a device map that keeps the embedding,
the first ``--main-layers`` decoder layers, the final norm and the LM head on the main device and puts
the remaining layers on the CPU (main device ``cuda``: accelerate keeps their weights in CPU memory and
streams them to the GPU for each forward) or on disk (main device ``cpu``). On each it measures dense
perplexity and the run config's first method (default ``pp`` at 40%), with a calibration computed on
that very model (the calibration cache is off), and fails (exit status 1) when a split perplexity
differs from the single-device one by more than ``--rtol``. Without the data folder the repository's
own documentation is the text (the comparison holds on any text).

    python benchmarks/device_map_check.py --device cuda --out benchmarks/results/device-map-cuda
    python benchmarks/device_map_check.py --device cpu --set data.seq_len=128 --set data.max_batches=3 \\
        --set calibration.n_samples=8          # a quick look on a CPU (layers offloaded to disk)

Writes ``device_map.json`` and ``device_map.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ppframework import data as data_mod
from ppframework.adapters import get_adapter
from ppframework.api import build_pipeline, load_config, load_eval_text
from ppframework.errors import ConfigError
from ppframework.metrics.perplexity import evaluate_perplexity
from ppframework.models import load_model

logger = logging.getLogger("device_map_check")


def split_map(model: torch.nn.Module, main: int | str, other: str, main_layers: int) -> dict[str, int | str]:
    """Every top-level module on ``main``; decoder layers from ``main_layers`` on go to ``other``."""
    layers = get_adapter(model).layers
    mapping: dict[str, int | str] = {}

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if child is layers:
                for index in range(len(layers)):
                    mapping[f"{prefix}{name}.{index}"] = main if index < main_layers else other
            elif any(sub is layers for sub in child.modules()):
                visit(f"{prefix}{name}.", child)
            else:
                mapping[f"{prefix}{name}"] = main

    visit("", model)
    return mapping


def repository_text(folder: Path) -> Path:
    """The repository's Markdown documentation as a .txt corpus (one document per file), for machines
    without the data folder."""
    root = Path(__file__).resolve().parents[1]
    files = [*sorted((root / "docs").glob("*.md")), root / "README.md", root / "benchmarks" / "README.md"]
    documents = [" ".join(file.read_text(encoding="utf-8").split()) for file in files if file.is_file()]
    path = folder / "repository-docs.txt"
    path.write_text("\n".join(documents) + "\n", encoding="utf-8")
    return path


def measure(model: torch.nn.Module, tokenizer: Any, cfg: Any, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Dense and first-method perplexity (with its own calibration) of ``model``."""
    start = time.perf_counter()
    dense = evaluate_perplexity(model, batches, warmup_batches=cfg.data.warmup_batches, progress=False)
    pipe = build_pipeline(model, cfg, tokenizer=tokenizer, progress=False)
    with pipe:
        pruned = evaluate_perplexity(
            model, batches, warmup_batches=cfg.data.warmup_batches, progress=False, untracked=pipe.untracked
        )
    return {
        "dense": dense.perplexity,
        "method": pruned.perplexity,
        "realised_ratio": pipe.realised_ratio(cfg.data.warmup_batches),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cuda", help="the main device: cuda, cuda:N or cpu")
    parser.add_argument("--main-layers", type=int, default=None, help="layers kept on it (default: half)")
    parser.add_argument("--rtol", type=float, default=1e-3, help="allowed relative perplexity difference")
    parser.add_argument("--out", default=None, help="folder for device_map.json and device_map.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"device_map_check: torch {torch.__version__} sees no CUDA device")
    overrides = ["calibration.cache=false", *args.overrides]
    cfg = load_config(args.config, overrides)
    scratch = tempfile.TemporaryDirectory(prefix="ppf-device-map-")
    corpus = "the config's data"
    try:
        text = load_eval_text(cfg)
    except ConfigError as exc:  # no data folder on this machine: any text compares the placements
        fallback = repository_text(Path(scratch.name))
        logger.warning("%s; using the repository's documentation (%s) as text instead", exc, fallback)
        corpus = "the repository's documentation (data folder absent)"
        cfg = load_config(
            args.config, [*overrides, f"data.name={fallback}", f"calibration.dataset={fallback}"]
        )
        text = load_eval_text(cfg)
    name, dtype = cfg.model.name, cfg.model.dtype

    single, tokenizer = load_model(name, dtype=dtype, device=str(device), gguf_file=cfg.model.gguf_file)
    ids = data_mod.tokenize_text(text, tokenizer)
    windows = data_mod.make_windows(ids, cfg.data.seq_len, cfg.data.window_policy, cfg.seed)
    if cfg.data.window_bos:
        windows = data_mod.start_with_bos(windows, tokenizer)
    batches = data_mod.batched(windows, cfg.data.batch_size)[: cfg.data.max_batches or None]
    n_layers = get_adapter(single).num_layers
    main_layers = n_layers // 2 if args.main_layers is None else args.main_layers
    main: int | str = (device.index or 0) if device.type == "cuda" else "cpu"
    other = "cpu" if device.type == "cuda" else "disk"
    mapping = split_map(single, main, other, main_layers)
    rows = {"single": measure(single, tokenizer, cfg, batches)}
    del single
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    folder = Path(scratch.name) / "offload"
    split, _ = load_model(
        name, dtype=dtype, gguf_file=cfg.model.gguf_file, device_map=mapping, offload_folder=str(folder)
    )
    rows["split"] = measure(split, tokenizer, cfg, batches)
    del split
    gc.collect()
    scratch.cleanup()

    label = cfg.methods[0].label
    where = f"layers 0-{main_layers - 1} on {device}, {main_layers}-{n_layers - 1} on {other}"
    lines = [
        f"# {name}: one device ({device}) vs device map ({where})",
        "",
        f"{len(batches)} batches of {cfg.data.batch_size} x {cfg.data.seq_len} from {corpus}, dtype "
        f"{dtype}, calibration {cfg.calibration.n_samples} windows per model",
        "",
        f"| placement | dense ppl | {label} ppl | realised ratio | seconds |",
        "|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        lines.append(
            f"| {key} | {row['dense']:.4f} | {row['method']:.4f} | {row['realised_ratio']:.3f} | "
            f"{row['seconds']:.1f} |"
        )
    failures = []
    for column in ("dense", "method"):
        a, b = rows["single"][column], rows["split"][column]
        if abs(b - a) > args.rtol * abs(a):
            failures.append(f"{column}: split {b:.6g} vs single {a:.6g} (rtol {args.rtol})")
    lines += ["", "MISMATCH: " + "; ".join(failures) if failures else f"match within rtol {args.rtol}"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "device_map.md").write_text(table + "\n")
        report = {"model": name, "device": str(device), "map": mapping, "rows": rows, "failures": failures}
        (out / "device_map.json").write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
