"""Paired bootstrap of per-item generation metrics between two methods of one ``ppf eval`` run.

Reads the run's ``generations.jsonl`` (one line per method and item, with its per-item ROUGE or pass
values) and, for each ``--pair A B``, resamples the items both methods answered: the mean difference
A - B of each metric and its percentile confidence interval. Differences whose interval contains 0 are
not resolved by the items measured.

    python benchmarks/paired_bootstrap.py runs/eval-xsum200/generations.jsonl \\
        --pair "pp-prompt 20%" "griffin 27%" --pair "pp-prompt 40%" "griffin 53%"
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--help`` lists every option)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("generations", help="a ppf eval run's generations.jsonl")
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"), help="methods")
    parser.add_argument(
        "--metrics", nargs="+", default=["rouge1", "rouge2", "rougeL"], help="per-item fields to compare"
    )
    parser.add_argument("--task", default=None, help="only this task's items (default: every task)")
    parser.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load(path: str, task: str | None) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    """method -> (task, item id) -> the item's record."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"generations: {path} does not exist")
    by_method: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"generations: line {number} of {path} is not JSON ({err})") from err
        if task is not None and record.get("task") != task:
            continue
        by_method.setdefault(record["method"], {})[(record["task"], str(record["item_id"]))] = record
    return by_method


def paired_interval(
    differences: list[float], resamples: int, confidence: float, seed: int
) -> tuple[float, float, float]:
    """(mean difference, lower, upper): percentile bootstrap of the mean over resampled items."""
    rng = random.Random(seed)
    n = len(differences)
    means = sorted(statistics.fmean(rng.choices(differences, k=n)) for _ in range(resamples))
    tail = (1.0 - confidence) / 2.0
    low = means[int(tail * resamples)]
    high = means[min(resamples - 1, int((1.0 - tail) * resamples))]
    return statistics.fmean(differences), low, high


def main(argv: list[str] | None = None) -> int:
    """Print one markdown row per pair and metric."""
    args = parse_args(argv)
    if not 0.0 < args.confidence < 1.0:
        raise SystemExit(f"--confidence: {args.confidence} is not between 0 and 1")
    by_method = load(args.generations, args.task)
    print(f"| A | B | metric | items | mean A - B | {args.confidence:.0%} interval | resolved |")
    print("|---|---|---|---|---|---|---|")
    for a, b in args.pair:
        missing = [m for m in (a, b) if m not in by_method]
        if missing:
            known = ", ".join(by_method)
            raise SystemExit(f"--pair: no items for {', '.join(missing)}; the file has {known}")
        items = sorted(set(by_method[a]) & set(by_method[b]))
        for metric in args.metrics:
            absent = [m for m in (a, b) if any(metric not in by_method[m][i] for i in items)]
            if absent:
                raise SystemExit(f"--metrics: {metric!r} is missing from items of {', '.join(absent)}")
            diffs = [float(by_method[a][i][metric]) - float(by_method[b][i][metric]) for i in items]
            mean, low, high = paired_interval(diffs, args.resamples, args.confidence, args.seed)
            resolved = "yes" if low > 0 or high < 0 else "no"
            interval = f"{low:+.4f} .. {high:+.4f}"
            print(f"| {a} | {b} | {metric} | {len(items)} | {mean:+.4f} | {interval} | {resolved} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
