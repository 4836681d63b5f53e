"""Prompt-conditioned quality: fidelity to dense and continuation perplexity, which see no future tokens.

For a run config (model, calibration, methods), every method at every ``--ratios`` value and
``--batch-sizes`` value gets one row:

* fidelity to dense on each prompt set (``--prompt-sets``: XSum, HumanEval, MBPP prompts as
  ``ppf eval`` builds them): the dense model's greedy continuation of ``--new-tokens`` tokens
  (computed once per prompt set, batch 1), teacher-forced under the decision the method made on the
  prompt alone; mean top-1 agreement and mean KL(dense || method) per token;
* continuation perplexity on each corpus (``--corpora``: ``wikitext2``, ``c4``, or a file):
  ``--windows`` windows of ``--window-len`` tokens, decided on their first ``--prefix-len`` tokens,
  scored on the rest.

See docs/evaluation.md ("Measures without future tokens") and ``ppframework/generation/fidelity.py``.
Methods come from the config, or from ``--methods`` (preset names); ``--set`` overrides the config
like ``ppf run`` (``methods.N.*`` addresses the method list after ``--methods``), ``--method-set``
overrides every method (``decode=dense``). Calibration is computed once (or read from the runner's
calibration cache) and cloned for every measurement; each measurement gets a fresh pipeline.

``results.json`` and ``results.md`` in ``--out`` are rewritten after every row; a rerun with the same
settings keeps the rows already there and computes only the missing ones.

    python benchmarks/prompt_conditioned.py configs/smollm2-pp-20-40.yaml --methods dense pp flap \\
        --ratios 0.2 0.4 --batch-sizes 1 8 --out runs/prompt-conditioned
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ppframework import data as data_mod
from ppframework.api import build_pipeline, calibration_history, load_config, needs_calibration
from ppframework.config import PRESETS, RunConfig, apply_overrides, read_config_file
from ppframework.errors import ConfigError
from ppframework.generation.fidelity import (
    FidelityResult,
    continuation_perplexity,
    dense_continuations,
    fidelity,
)
from ppframework.generation.fidelity_eval import fitting_prompt_ids
from ppframework.generation.tasks import GENERATION_TASKS
from ppframework.models import load_model, load_model_kwargs
from ppframework.outputs import atomic_write_text, write_json

logger = logging.getLogger("prompt_conditioned")

SCHEMA = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--help`` lists every option)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML or JSON run config (model, calibration, methods)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="PRESET",
        help=f"presets to run instead of the config's methods ({', '.join(PRESETS)})",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="NAME",
        help="keep only the config's methods with these names (a method's name, else its preset)",
    )
    parser.add_argument(
        "--ratios", nargs="+", type=float, default=None, help="pruning ratios (default: each method's own)"
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="decision batch sizes")
    parser.add_argument(
        "--prompt-sets", nargs="*", default=list(GENERATION_TASKS), help="prompt sets for fidelity"
    )
    parser.add_argument("--corpora", nargs="*", default=["wikitext2", "c4"], help="corpora for perplexity")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per prompt set (first N)")
    parser.add_argument(
        "--prompt-offset",
        type=int,
        default=0,
        help="skip this many items of each prompt set first (e.g. choose settings on items 16-31, "
        "report on 0-15)",
    )
    parser.add_argument(
        "--mixed-batches",
        action="store_true",
        help="fidelity batches mix the prompt sets (round-robin: a code prompt beside a news article) "
        "instead of holding one set each; each prompt's scores still count for its own set",
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="dense continuation tokens per prompt")
    parser.add_argument("--windows", type=int, default=16, help="windows per corpus")
    parser.add_argument(
        "--window-len", type=int, default=None, help="tokens per window (default data.seq_len)"
    )
    parser.add_argument(
        "--prefix-len", type=int, default=None, help="decision prefix (default half a window)"
    )
    parser.add_argument(
        "--no-stop-at-eos",
        action="store_true",
        help="score all --new-tokens dense tokens (default: a continuation ends at its first EOS)",
    )
    parser.add_argument(
        "--step-tokens",
        type=int,
        default=None,
        help="teacher-force in decode steps of this many tokens (default: all in one; 1: one by one)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override the config"
    )
    parser.add_argument(
        "--method-set", action="append", default=[], metavar="FIELD=VALUE", help="override every method"
    )
    parser.add_argument("--out", default="runs/prompt-conditioned", help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- plan


def plan_config(args: argparse.Namespace) -> RunConfig:
    """The run config whose methods are every method x ratio of the command line, fully validated."""
    raw = read_config_file(args.config)
    if args.methods:
        raw["methods"] = [{"preset": name} for name in args.methods]
    raw = apply_overrides(raw, args.set)
    methods: list[dict[str, Any]] = []
    listed = [{"preset": m} if isinstance(m, str) else m for m in raw.get("methods") or [{"preset": "pp"}]]
    if args.only:
        names = [m.get("name") or m.get("preset") for m in listed]
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise ConfigError(f"--only: no method named {unknown}; the config has {sorted(set(names))}")
        listed = [m for m, name in zip(listed, names, strict=True) if name in args.only]
    for method in listed:
        method = apply_overrides(method, args.method_set, default_methods=False)
        dense = method.get("preset") == "dense"
        for ratio in [None] if args.ratios is None or dense else args.ratios:
            one = copy.deepcopy(method)
            if ratio is not None:
                one.setdefault("pruning", {})["ratio"] = ratio
            methods.append(one)
    cfg = load_config({**raw, "methods": methods})
    labels = [m.label for m in cfg.methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(
            f"duplicate method labels {labels}; name the methods apart (--set methods.N.name=...)"
        )
    return cfg


def settings(args: argparse.Namespace, cfg: RunConfig, window_len: int, prefix_len: int) -> dict[str, Any]:
    """What the rows depend on besides the method (a rerun keeps rows only when these match)."""
    return {
        "schema": SCHEMA,
        "model": cfg.model.name,
        "calibration": cfg.calibration.model_dump(mode="json"),
        "calibration_seq_len": cfg.calibration_seq_len,
        "seed": cfg.seed,
        "prompt_sets": list(args.prompt_sets),
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "stop_at_eos": not args.no_stop_at_eos,
        "corpora": list(args.corpora),
        "windows": args.windows,
        "window_len": window_len,
        "prefix_len": prefix_len,
        "window_policy": cfg.data.window_policy,
        "window_bos": cfg.data.window_bos,
        "step_tokens": args.step_tokens,
        **({"prompt_offset": args.prompt_offset} if args.prompt_offset else {}),
        **({"mixed_batches": True} if args.mixed_batches else {}),
    }


# --------------------------------------------------------------------------- data


def prompt_set(
    name: str,
    cfg: RunConfig,
    tokenizer: Any,
    limit: int,
    new_tokens: int,
    positions: int | None,
    offset: int = 0,
) -> list[list[int]]:
    """``limit`` prompts of a generation task from item ``offset`` on, as token ids, cut (XSum) or left
    out (code) to fit the history's positions, and the model's ``positions`` with the new tokens."""
    fits = (
        cfg.calibration_seq_len if positions is None else min(cfg.calibration_seq_len, positions - new_tokens)
    )
    return fitting_prompt_ids(name, cfg.data.data_dir, tokenizer, limit, fits, offset)


def corpus_windows(name: str, cfg: RunConfig, tokenizer: Any, n: int, length: int) -> torch.Tensor:
    """The first ``n`` windows of ``length`` tokens of a corpus, cut as ``ppf run`` cuts them."""
    split = "validation" if name == "c4" else cfg.data.split if name == cfg.data.name else "test"
    ids = data_mod.tokenize_text(data_mod.load_corpus_text(name, split, cfg.data.data_dir), tokenizer)
    windows = data_mod.make_windows(ids, length, cfg.data.window_policy, cfg.seed, max_windows=n)
    return data_mod.start_with_bos(windows, tokenizer) if cfg.data.window_bos else windows


def interleaved(prompts: dict[str, list[list[int]]]) -> list[tuple[str, int]]:
    """Every prompt as (set, index), the sets taken round-robin (set A's first, set B's first, ...), so
    that consecutive prompts, and so every batch of more than one, come from different sets."""
    longest = max((len(ids) for ids in prompts.values()), default=0)
    return [(name, i) for i in range(longest) for name, ids in prompts.items() if i < len(ids)]


def split_by_set(result: FidelityResult, order: list[tuple[str, int]]) -> dict[str, FidelityResult]:
    """A fidelity result over the prompts ``order`` names (each set's in its own order, as
    :func:`interleaved` gives them), back into one result per set."""
    parts: dict[str, FidelityResult] = {}
    for (name, _), scores in zip(order, result.prompts, strict=True):
        part = parts.setdefault(name, FidelityResult())
        part.prompts.append(scores)
        part.dense_agree += scores.dense_agree
    return parts


# --------------------------------------------------------------------------- output


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """One row per method x ratio x batch size: top-1 and KL per prompt set, perplexity per corpus."""
    s = report["settings"]
    sets, corpora = s["prompt_sets"], s["corpora"]
    header = ["method", "ratio", "batch"]
    header += [f"{p} top-1" for p in sets] + [f"{p} KL" for p in sets] + [f"{c} cont. ppl" for c in corpora]
    lines = [
        f"Model `{s['model']}`; fidelity: first {s['prompts']} prompts, {s['new_tokens']} dense greedy tokens"
        f"{' (to the first EOS)' if s['stop_at_eos'] else ''}; continuation perplexity: {s['windows']} "
        f"windows of {s['window_len']} tokens, decided on the first {s['prefix_len']}"
        f"{'; fidelity batches mix the prompt sets (round-robin)' if s.get('mixed_batches') else ''}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in report["rows"]:
        cells = [row["method"], f"{row['ratio']:.0%}", str(row["batch_size"])]
        if "error" in row:
            lines.append("| " + " | ".join(cells + [f"failed: {row['error'][:80]}"]) + " |")
            continue
        fid = row.get("fidelity", {})
        cells += [_cell((fid.get(p) or {}).get("top1"), 4) for p in sets]
        cells += [_cell((fid.get(p) or {}).get("kl"), 5) for p in sets]
        ppl = row.get("continuation_perplexity", {})
        cells += [_cell((ppl.get(c) or {}).get("perplexity"), 3) for c in corpora]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = report.get("skipped") or {}
    lines += ["", *(f"- {name} skipped: {why}" for name, why in skipped.items())] if skipped else []
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict[str, Any]) -> None:
    """results.json and results.md, each replaced atomically."""
    write_json(out / "results.json", report)
    atomic_write_text(out / "results.md", markdown(report))


def previous_rows(out: Path, current: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of an earlier run with the same settings in ``out`` (none otherwise)."""
    path = out / "results.json"
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if old.get("settings") != current:
        logger.info("%s has other settings: starting afresh", path)
        return []
    return [row for row in old.get("rows", []) if "error" not in row]  # failed rows run again


# --------------------------------------------------------------------------- run


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 when a row failed, 130 when interrupted (rows are kept)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = plan_config(args)
    window_len = args.window_len or cfg.data.seq_len
    prefix_len = args.prefix_len or window_len // 2
    refuses = any(m.needs_calibration and m.history.beyond == "refuse" for m in cfg.methods)
    if not 1 <= prefix_len < window_len or (refuses and prefix_len > cfg.calibration_seq_len):
        raise ConfigError(
            f"--prefix-len {prefix_len}: must be below --window-len {window_len}"
            + (f" and fit the history ({cfg.calibration_seq_len} positions)" if refuses else "")
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    current = settings(args, cfg, window_len, prefix_len)
    wanted = {(m.label, b) for m in cfg.methods for b in args.batch_sizes}
    # Every finished row of the same settings stays in the file, also those this run does not plan
    # (another --methods / --batch-sizes run wrote them); only the planned missing ones are computed.
    rows = previous_rows(out, current)
    others = [row for row in rows if (row["method"], row["batch_size"]) not in wanted]
    if others:
        logger.info("keeping %d earlier row(s) of %s outside this run's plan", len(others), out)
    done = {(row["method"], row["batch_size"]) for row in rows}
    todo = [(i, b) for i, m in enumerate(cfg.methods) for b in args.batch_sizes if (m.label, b) not in done]
    if not todo:
        logger.info("every row is already in %s", out / "results.json")
        return 0

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model.name, **load_model_kwargs(cfg.model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    positions = getattr(model.config, "max_position_embeddings", None)
    skipped: dict[str, str] = {}
    prompts: dict[str, list[list[int]]] = {}
    for name in args.prompt_sets:
        try:
            prompts[name] = prompt_set(
                name, cfg, tokenizer, args.prompts, args.new_tokens, positions, args.prompt_offset
            )
        except ConfigError as exc:
            logger.warning("prompt set %s skipped: %s", name, exc)
            skipped[name] = str(exc)
    windows: dict[str, torch.Tensor] = {}
    for name in args.corpora:
        try:
            windows[name] = corpus_windows(name, cfg, tokenizer, args.windows, window_len)
        except ConfigError as exc:
            logger.warning("corpus %s skipped: %s", name, exc)
            skipped[name] = str(exc)
    references = {
        name: dense_continuations(
            model, ids, args.new_tokens, pad_token_id=pad, stop_at_eos=not args.no_stop_at_eos
        )
        for name, ids in prompts.items()
    }
    history = (
        calibration_history(model, tokenizer, cfg, not args.no_progress)[0]
        if needs_calibration(cfg)
        else None
    )

    report = {"settings": current, "rows": rows, "skipped": skipped, "complete": False}
    bar = tqdm(todo, desc="rows", unit="row", disable=args.no_progress)

    def pipeline(index: int) -> Any:
        """A fresh pipeline for one measurement (its own copy of the calibration history)."""
        needs = history is not None and cfg.methods[index].needs_calibration
        clone = history.clone() if needs else None
        return build_pipeline(model, cfg, method_index=index, tokenizer=tokenizer, history=clone)

    def measure(index: int, batch_size: int, row: dict[str, Any]) -> None:
        # One fidelity run (one fresh pipeline) per group of prompts: each set alone, or all mixed.
        groups = (
            [interleaved(prompts)]
            if args.mixed_batches
            else [[(name, i) for i in range(len(ids))] for name, ids in prompts.items()]
        )
        for order in groups:
            result = fidelity(
                model,
                pipeline(index),
                [prompts[name][i] for name, i in order],
                [references[name][i] for name, i in order],
                pad_token_id=pad,
                batch_size=batch_size,
                step_tokens=args.step_tokens,
            )
            for name, part in split_by_set(result, order).items():
                row["fidelity"][name] = part.to_json()
        for name, win in windows.items():
            usable = win[: win.shape[0] - win.shape[0] % batch_size]  # every decision on a full batch
            if usable.shape[0] == 0:
                skipped[f"{name} at batch {batch_size}"] = f"{win.shape[0]} windows fill no batch"
                continue
            result = continuation_perplexity(
                model,
                pipeline(index),
                usable,
                prefix_len,
                batch_size=batch_size,
                step_tokens=args.step_tokens,
            )
            row["continuation_perplexity"][name] = result.to_json()

    try:
        for index, batch_size in bar:
            method = cfg.methods[index]
            bar.set_postfix_str(f"{method.label} batch {batch_size}")
            row: dict[str, Any] = {
                "method": method.label,
                "preset": method.preset or method.name,
                "ratio": method.pruning.ratio,
                "batch_size": batch_size,
                "fidelity": {},
                "continuation_perplexity": {},
            }
            start = time.perf_counter()
            try:
                measure(index, batch_size, row)
            except Exception as exc:  # one method's failure must not lose the other rows
                logger.error("%s at batch %d failed: %s", method.label, batch_size, exc, exc_info=True)
                row["error"] = f"{type(exc).__name__}: {exc}"
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            write(out, report)
        report["complete"] = True
        write(out, report)
    except KeyboardInterrupt:
        bar.close()
        logger.warning("interrupted: %d finished rows are in %s", len(rows), out)
        write(out, report)
        return 130
    failed = [f"{row['method']} (batch {row['batch_size']})" for row in rows if "error" in row]
    if failed:
        logger.error("failed rows (rerun to retry them): %s", ", ".join(failed))
    logger.info("wrote %s and %s", out / "results.json", out / "results.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
