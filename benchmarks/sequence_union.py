"""How large the union of the rows' kept units is under ``decision: sequence`` (``sequence_decode:
union``): a quality/size figure, no timing.

For each batch of ``--batch`` prompts, every row decides alone at its prefill (a ``decision: sequence``
method, ``pp-prompt`` by default); the union decode runs the batch on the union of the rows' kept units.
This reports, per ratio, the mean share of the decoder's prunable projection weights that each row's own
masks keep, and the share the union keeps (what a union decode step reads), over the batches.

    .venv/bin/python benchmarks/sequence_union.py configs/prompt-conditioned-smollm2.yaml \\
        --preset pp-prompt --ratios 0.2 0.4 --batch 8 --batches 4 --prompt-sets xsum wikitext2

Prompts: XSum articles as ``ppf eval`` forms them (cut to the calibrated positions), and WikiText-2
windows of ``--window`` tokens. The calibration is the config's (cached with the other runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ppframework import data as data_mod
from ppframework.api import build_pipeline, calibration_history, load_config
from ppframework.config import RunConfig
from ppframework.generation.fidelity_eval import fitting_prompt_ids
from ppframework.models import load_model, load_model_kwargs
from ppframework.outputs import atomic_write_text, write_json
from ppframework.pipeline.rows import union_masks

logger = logging.getLogger("sequence_union")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a run config (model, data folder, calibration)")
    parser.add_argument("--preset", default="pp-prompt", help="a decision: sequence preset")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="batches per prompt set")
    parser.add_argument("--prompt-sets", nargs="+", default=["xsum", "wikitext2"])
    parser.add_argument("--window", type=int, default=256, help="WikiText-2 prompt length in tokens")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def prompts_of(name: str, cfg: RunConfig, tokenizer: Any, n: int, window: int) -> list[list[int]]:
    """``n`` prompts (token ids) of a prompt set."""
    if name == "wikitext2":
        ids = data_mod.tokenize_text(
            data_mod.load_corpus_text("wikitext2", "test", cfg.data.data_dir), tokenizer
        )
        windows = data_mod.make_windows(ids, window, "contiguous", cfg.seed, max_windows=n)
        return [row.tolist() for row in windows]
    return fitting_prompt_ids(name, cfg.data.data_dir, tokenizer, n, cfg.calibration_seq_len, 0)


def left_padded(prompts: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config)
    methods = [
        {"preset": args.preset, "pruning": {"ratio": r}, "sequence_decode": "union"} for r in args.ratios
    ]
    cfg = cfg.model_copy(update={"methods": [type(cfg.methods[0]).model_validate(m) for m in methods]})
    model, tokenizer = load_model(cfg.model.name, **load_model_kwargs(cfg.model))
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    history, _ = calibration_history(model, tokenizer, cfg, not args.no_progress)
    prompts = {
        name: prompts_of(name, cfg, tokenizer, args.batch * args.batches, args.window)
        for name in args.prompt_sets
    }
    rows = []
    for index, method in enumerate(cfg.methods):
        for name, ids in prompts.items():
            pipe = build_pipeline(
                model, cfg, method_index=index, tokenizer=tokenizer, history=history.clone()
            )
            total = pipe.total_prunable_params()
            own, union, unit_share = [], [], []
            batches = [ids[i : i + args.batch] for i in range(0, len(ids), args.batch)]
            for batch in tqdm(batches, desc=f"{method.label} {name}", disable=args.no_progress):
                with pipe, torch.inference_mode():
                    model(**left_padded(batch, pad))
                masks = pipe.last_row_masks
                joined = union_masks(masks)
                assert not isinstance(joined, str), joined
                own.append(sum(1 - pipe.removed_by_masks(m) / total for m in masks) / len(masks))
                union.append(1 - pipe.removed_by_masks(joined) / total)
                unit_share.append(sum(m.n_kept / m.total_units for m in joined.values()) / len(joined))
            pipe.release()
            row = {
                "method": method.label,
                "prompts": name,
                "batch": args.batch,
                "batches": len(batches),
                "row_kept_fraction": sum(own) / len(own),
                "union_kept_fraction": sum(union) / len(union),
                "union_kept_fraction_min": min(union),
                "union_kept_fraction_max": max(union),
                "union_unit_share_per_block": sum(unit_share) / len(unit_share),
            }
            logger.info("%s", json.dumps(row))
            rows.append(row)
    lines = [
        f"model {cfg.model.name}; {args.preset}, decision: sequence; batches of {args.batch} prompts "
        f"({args.batches} per set); XSum prompts cut to {cfg.calibration_seq_len} tokens, WikiText-2 "
        f"windows of {args.window}; calibration {cfg.calibration.dataset} x {cfg.calibration.n_samples}",
        "",
        "| method | prompts | kept by each row's own masks | kept by the union (min-max over batches) "
        "| union's units per block |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['prompts']} | {r['row_kept_fraction']:.3f} "
            f"| {r['union_kept_fraction']:.3f} "
            f"({r['union_kept_fraction_min']:.3f}-{r['union_kept_fraction_max']:.3f}) "
            f"| {r['union_unit_share_per_block']:.3f} |"
        )
    lines += [
        "",
        "kept = share of the decoder's prunable attention + MLP projection weights (skipped layers kept).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "results.json", {"settings": vars(args) | {"out": str(args.out)}, "rows": rows})
        atomic_write_text(args.out / "results.md", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
