"""Per-block diagnostic: how far each scorer's choice of units is from the best choice, block by block.

For one model and one batch, every method decides every pruned block from the *dense* activations of
that batch (``prefill: dense``: the layer runs unpruned and the method's probe, fusion and metric
decide from what it computed; static methods use their calibration decision). Each block's choice
is then scored on the same dense activations by the error it causes in the block's output::

    err(K) = ||post(W[:, K] X[K] + b + bias_K) - post(W X + b)||^2 / ||post(W X + b)||^2

with ``X`` the output projection's input over every token of the batch, ``post`` what the block
output passes through before the residual (Gemma 3's post-norm; the identity elsewhere) and
``bias_K`` a method's compensation bias (FLAP's). For attention the best choice is found by trying
every set of heads of the same size (when there are at most ``--max-sets`` of them); a method's
*excess* is its error minus the best (the best is searched without compensation, so a method with
a compensation bias can come out below it, a negative excess). MLP channel sets are too many to
enumerate, so the MLP columns give each method's error and its excess over the best method in the
table (not over the true best).

    python benchmarks/block_choice.py --model smollm2-135m --seq-len 256 --ratio 0.4 \\
        --out benchmarks/results/block-choice-smollm2
    python benchmarks/block_choice.py --model gemma3-270m --window-bos --seq-len 256 --ratio 0.4 \\
        --out benchmarks/results/block-choice-gemma3

Writes ``block_choice.md`` (the summary table and the per-layer attention table) and
``block_choice.json`` (every block's errors) under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ppframework.adapters import get_adapter
from ppframework.api import load_config
from ppframework.calibration.orchestration import calibration_history
from ppframework.models import load_model
from ppframework.pipeline import Pipeline
from ppframework.runner.settings import eval_batches
from ppframework.types import BlockKind

logger = logging.getLogger("block_choice")

_WANDA_GAIN_L2 = {"score_channels": {"name": "wanda", "params": {"output_gain": True, "head_reduce": "l2"}}}

#: label -> method dict (before the ratio and ``prefill: dense`` are added)
METHODS: dict[str, dict[str, Any]] = {
    "pp": {"preset": "pp"},
    "full-batch": {"preset": "full-batch"},
    "history-only": {"preset": "history-only"},
    "static-ppsp": {"preset": "static-ppsp"},
    "wanda-sp": {"preset": "wanda-sp"},
    "flap-uniform": {"preset": "flap-uniform"},
    "pp-gain": {"preset": "pp-gain"},
    "pp-wanda": {"preset": "pp-wanda"},
    "pp-wanda-l2": {"preset": "pp-wanda", "strategies": _WANDA_GAIN_L2},
    "full-batch-wanda-l2": {"preset": "full-batch", "strategies": _WANDA_GAIN_L2},
    "pp-wanda-heads": {"preset": "pp-wanda-heads"},
    "pp-comp-heads": {"preset": "pp-comp-heads"},
}


def run_config(args: argparse.Namespace, labels: list[str]) -> Any:
    """The run config: the data and calibration of the study's protocol, one method per label."""
    methods = []
    for label in labels:
        method = json.loads(json.dumps(METHODS[label]))
        method["name"] = label
        method["pruning"] = {"ratio": args.ratio}
        method["prefill"] = "dense"
        methods.append(method)
    return load_config(
        {
            "model": {"name": args.model, "device": "cpu"},
            "data": {
                "name": args.data,
                "split": "test",
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "window_policy": "random",
                "max_batches": args.batch + 1,
                "window_bos": args.window_bos,
            },
            "calibration": {
                "dataset": "c4",
                "split": "validation",
                "n_samples": args.calibration_samples,
                "batch_size": 8,
            },
            "seed": args.seed,
            "methods": methods,
        }
    )


def decisions(model: Any, cfg: Any, history: Any, batch: torch.Tensor) -> dict[str, dict[Any, Any]]:
    """Every method's masks for ``batch``, decided from the batch's dense activations."""
    out = {}
    for method in tqdm(cfg.methods, desc="methods", unit="method"):
        pipe = Pipeline(model, method, history=history.clone(), seed=cfg.seed)
        with pipe, torch.no_grad():
            model(input_ids=batch, use_cache=False)
        out[method.label] = dict(pipe.last_masks)
        pipe.release()
    return out


def _relative_error(post: Any, pruned: torch.Tensor, target: torch.Tensor, energy: float) -> float:
    return float((post(pruned) - target).square().sum()) / energy


def block_errors(
    model: Any, batch: torch.Tensor, masks: dict[str, dict[Any, Any]], max_sets: int
) -> dict[tuple[int, BlockKind], dict[str, Any]]:
    """Every block's error for every method's choice (and, for attention, the best set's)."""
    adapter = get_adapter(model)
    keys = sorted({key for per in masks.values() for key in per}, key=lambda k: (k[0], k[1].value))
    results: dict[tuple[int, BlockKind], dict[str, Any]] = {}

    def measure(key: tuple[int, BlockKind], x: torch.Tensor) -> None:
        layer, kind = key
        runner = adapter.runner(layer, kind)
        weight = runner.out_proj.weight.float()
        bias = runner.out_proj.bias.float() if runner.out_proj.bias is not None else 0.0
        x = x.float().reshape(-1, x.shape[-1])
        zero = torch.zeros(x.shape[0], weight.shape[0])

        def post(out: torch.Tensor) -> torch.Tensor:
            return adapter.block_residual(adapter.layers[layer], kind, zero, out).float()

        full = x @ weight.T + bias
        target = post(full)
        energy = float(target.square().sum())
        width = runner.geometry.unit_width
        row: dict[str, Any] = {"methods": {}}
        for label, per in masks.items():
            mask = per.get(key)
            if mask is None:
                continue
            kept = mask.kept_units.cpu()
            channels = (kept[:, None] * width + torch.arange(width)).reshape(-1) if width > 1 else kept
            pruned = x[:, channels] @ weight[:, channels].T + bias
            if mask.output_bias is not None:
                pruned = pruned + mask.output_bias.float().cpu()
            row["methods"][label] = {
                "error": _relative_error(post, pruned, target, energy),
                "pruned_units": sorted(set(range(runner.geometry.units)) - set(kept.tolist())),
            }
        if kind is BlockKind.ATTENTION and row["methods"]:
            heads = runner.geometry.units
            n_pruned = len(next(iter(row["methods"].values()))["pruned_units"])
            if math.comb(heads, n_pruned) <= max_sets:
                parts = [
                    x[:, h * width : (h + 1) * width] @ weight[:, h * width : (h + 1) * width].T
                    for h in range(heads)
                ]
                best, best_set = math.inf, None
                for pruned_set in itertools.combinations(range(heads), n_pruned):
                    pruned = full - sum((parts[h] for h in pruned_set), torch.zeros_like(full))
                    err = _relative_error(post, pruned, target, energy)
                    if err < best:
                        best, best_set = err, list(pruned_set)
                row["best"] = {"error": best, "pruned_units": best_set}
        results[key] = row

    handles = []
    for key in keys:

        def hook(module: Any, args: tuple, key: tuple[int, BlockKind] = key) -> None:
            measure(key, args[0].reshape(batch.shape[0], -1, args[0].shape[-1]))

        handles.append(adapter.runner(*key).out_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return results


def summary(results: dict[tuple[int, BlockKind], dict[str, Any]], labels: list[str]) -> list[str]:
    """The markdown tables: per method, attention excess over the best head set and MLP errors."""
    attn = [r for (_, k), r in results.items() if k is BlockKind.ATTENTION and "best" in r]
    mlp = [r for (_, k), r in results.items() if k is BlockKind.MLP]
    lines = [
        "| method | attention: mean excess over the best head set | attention: best set chosen | "
        "attention: mean error | MLP: mean error | MLP: mean excess over the best method |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        a = [r for r in attn if label in r["methods"]]
        m = [r for r in mlp if label in r["methods"]]
        excess = [r["methods"][label]["error"] - r["best"]["error"] for r in a]
        hits = sum(sorted(r["methods"][label]["pruned_units"]) == r["best"]["pruned_units"] for r in a)
        a_err = [r["methods"][label]["error"] for r in a]
        m_err = [r["methods"][label]["error"] for r in m]
        m_excess = [r["methods"][label]["error"] - min(v["error"] for v in r["methods"].values()) for r in m]

        def mean(values: list[float]) -> str:
            return f"{sum(values) / len(values):.4f}" if values else "-"

        lines.append(
            f"| {label} | {mean(excess)} | {hits} of {len(a)} | {mean(a_err)} | {mean(m_err)} "
            f"| {mean(m_excess)} |"
        )
    lines += ["", "Attention, per layer: excess error over the best head set (pruned heads in brackets).", ""]
    lines.append("| layer | best | " + " | ".join(labels) + " |")
    lines.append("|---|---|" + "---|" * len(labels))
    for (layer, kind), r in sorted(results.items(), key=lambda kv: kv[0][0]):
        if kind is not BlockKind.ATTENTION or "best" not in r:
            continue
        cells = []
        for label in labels:
            m = r["methods"].get(label)
            cells.append("-" if m is None else f"{m['error'] - r['best']['error']:.3f} {m['pruned_units']}")
        best = f"{r['best']['error']:.3f} {r['best']['pruned_units']}"
        lines.append(f"| {layer} | {best} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext2", help="data.name (a corpus or a .jsonl of documents)")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="which evaluation batch (0 = the warm-up one)")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--window-bos", action="store_true", help="data.window_bos (Gemma 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sets", type=int, default=5000, help="most head sets to try per block")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = run_config(args, args.methods)
    model, tokenizer = load_model(args.model, device="cpu")
    model.eval()
    batch = eval_batches(cfg, tokenizer)[args.batch]
    history, _ = calibration_history(model, tokenizer, cfg)
    masks = decisions(model, cfg, history, batch)
    results = block_errors(model, batch, masks, args.max_sets)
    lines = [
        f"# Block choice: {args.model}, {args.data}, ratio {args.ratio}, batch {args.batch} "
        f"({args.batch_size} x {args.seq_len}), {args.calibration_samples} calibration windows",
        "",
        *summary(results, [m.label for m in cfg.methods]),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "block_choice.md").write_text("\n".join(lines) + "\n")
    serialisable = {f"{layer}.{kind.value}": row for (layer, kind), row in results.items()}
    record = {"args": vars(args) | {"out": str(args.out)}, "blocks": serialisable}
    (args.out / "block_choice.json").write_text(json.dumps(record, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
