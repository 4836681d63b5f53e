"""Cross-check the built-in zero-shot scorer against lm-evaluation-harness, request by request.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lm_eval_crosscheck.py --model smollm2-135m --limit 100 \\
        --out benchmarks/results/lm-eval-crosscheck

Dense model, the first ``--limit`` items of each task, both sides reading the same local files (the
harness through ppframework's offline task configs). For every request it compares the text, the
context/continuation token split and the log-likelihood; per task it reports acc / acc_norm of both,
and the built-in scorer's figures under its former rules (acc_norm over the continuation's UTF-8 bytes
with the leading space, acc_norm for BoolQ/WinoGrande, inputs cut to ``--old-max-length`` tokens) so
the effect of each fix is visible. Writes ``crosscheck.json`` and ``crosscheck.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from ppframework import harness
from ppframework.config import RunConfig
from ppframework.models import load_model
from ppframework.zeroshot import encode_pair, load_task, make_requests, score_requests
from ppframework.zeroshot.scoring import _argmax, _special_prefix

logger = logging.getLogger("lm_eval_crosscheck")


def _accuracy(items: list[Any], scores: list[float], divisor: Any) -> tuple[float, float]:
    """acc and acc_norm of ``items`` from per-request ``scores``, acc_norm dividing by ``divisor(cont)``."""
    acc = norm = 0
    position = 0
    for item in items:
        pairs = item.pairs()
        s = scores[position : position + len(pairs)]
        position += len(pairs)
        acc += _argmax(s) == item.label
        norm += _argmax([v / max(divisor(c), 1) for v, (_, c) in zip(s, pairs, strict=True)]) == item.label
    return acc / len(items), norm / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--old-max-length", type=int, default=512, help="the former truncation")
    parser.add_argument("--tasks", nargs="*", default=list(harness.OFFLINE_TASKS))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/lm-eval-crosscheck")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from lm_eval import simple_evaluate

    cfg = RunConfig.model_validate(
        {
            "model": {"name": args.model},
            "data": {"data_dir": args.data_dir},
            "methods": [],
            "evaluation": {
                "lm_eval": {
                    "enabled": True,
                    "tasks": args.tasks,
                    "limit": args.limit,
                    "batch_size": args.batch_size,
                }
            },
        }
    )
    plan = harness.plan_lm_eval(cfg)
    model, tok = load_model(cfg.model.name, dtype="float32", device="cpu")
    context = getattr(model.config, "max_position_embeddings", None)
    started = time.perf_counter()
    lm = harness.make_hflm(model, tok, args.batch_size, context)
    results = simple_evaluate(
        model=lm,
        tasks=args.tasks,
        limit=args.limit,
        task_manager=plan.manager(),
        log_samples=True,
        bootstrap_iters=0,
        random_seed=1234,
        numpy_random_seed=1234,
        torch_random_seed=1234,
    )
    harness_s = time.perf_counter() - started
    metrics = harness._task_metrics(results)
    prefix = _special_prefix(tok)
    rows, report = [], {}
    for task in args.tasks:
        items = load_task(task, limit=args.limit, data_dir=args.data_dir)
        requests = make_requests(items)
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        theirs_pairs = [tuple(a) for s in samples for a in s["arguments"]]
        theirs_ll = [float(r[0]) for s in samples for r in s["filtered_resps"]]
        ours_pairs = [(r.context, r.continuation) for r in requests]
        same_text = sum(a == b for a, b in zip(theirs_pairs, ours_pairs, strict=True))
        # both sides: (context ids with any BOS the tokenizer adds, continuation ids)
        same_split = sum(
            tuple(lm._encode_pair(*pair)) == encode_pair(tok, *pair, prefix=prefix) for pair in ours_pairs
        )
        t0 = time.perf_counter()
        ours = score_requests(model, tok, requests, args.batch_size, max_length=context, progress=False)
        ours_s = time.perf_counter() - t0
        long_ids = [
            i
            for i, p in enumerate(ours_pairs)
            if sum(map(len, encode_pair(tok, *p, prefix=prefix))) > args.old_max_length
        ]
        old_scores = list(ours)
        if long_ids:
            cut = score_requests(
                model,
                tok,
                [requests[i] for i in long_ids],
                args.batch_size,
                max_length=args.old_max_length - 1,
                progress=False,
            )
            for i, v in zip(long_ids, cut, strict=True):
                old_scores[i] = v
        max_diff = max(abs(a - b) for a, b in zip(theirs_ll, ours, strict=True))
        harness_metrics = metrics[task]
        acc, acc_norm = _accuracy(items, ours, lambda c: len(c.removeprefix(" ")))
        old_acc, old_norm = _accuracy(items, old_scores, lambda c: len(c.encode("utf-8")))
        has_norm = "acc_norm" in harness_metrics
        entry = {
            "requests": len(requests),
            "same_text": same_text,
            "same_token_split": same_split,
            "max_abs_loglik_diff": max_diff,
            "long_requests": len(long_ids),
            "builtin": {"acc": acc, "acc_norm": acc_norm if has_norm else None},
            "harness": {"acc": harness_metrics.get("acc"), "acc_norm": harness_metrics.get("acc_norm")},
            "builtin_before_fixes": {"acc": old_acc, "acc_norm": old_norm},
            "builtin_seconds": ours_s,
        }
        report[task] = entry
        rows.append((task, entry))
        logger.info("%s: %s", task, json.dumps(entry))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def f(v: float | None) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    lines = [
        f"model {args.model} (fp32, cpu, {torch.get_num_threads()} threads), dense, first {args.limit} items "
        f"per task, batch {args.batch_size}, lm-evaluation-harness {plan.version} with ppframework's offline "
        f"task configs, inputs up to {context} tokens on both sides; harness {harness_s:.0f} s",
        "",
        "| task | requests | same text / token split | max abs loglik diff | built-in acc / acc_norm "
        "| harness acc / acc_norm | built-in before the fixes acc / acc_norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, e in rows:
        b, h, o = e["builtin"], e["harness"], e["builtin_before_fixes"]
        lines.append(
            f"| {task} | {e['requests']} | {e['same_text']} / {e['same_token_split']} "
            f"| {e['max_abs_loglik_diff']:.1e} | {f(b['acc'])} / {f(b['acc_norm'])} "
            f"| {f(h['acc'])} / {f(h['acc_norm'])} | {f(o['acc'])} / {f(o['acc_norm'])} |"
        )
    (out / "crosscheck.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "crosscheck.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plan.close()


if __name__ == "__main__":
    main()
