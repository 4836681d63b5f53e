"""Paired bootstrap of the fidelity and continuation-perplexity measures of ``prompt_conditioned.py``.

Reads one or more ``results.json`` files of ``benchmarks/prompt_conditioned.py`` and, for each ``--pair
A B`` (method labels as in the file, e.g. ``"pp-prompt 20%"``) at ``--batch``, resamples what both rows
measured on the same items:

* **mean top-1 agreement** and **mean KL(dense || method)**, the tables' "mean" (the unweighted mean of
  the prompt sets' token-weighted values): the prompts are resampled within each set (the same draws
  for A and B), so each set keeps its weight; the difference A - B and its percentile interval;
* **continuation perplexity** of every corpus both rows have per-window NLLs for (rows written since
  ``window_nll`` was recorded): the windows are resampled and the ratio ``ppl(A) / ppl(B)`` reported.

A difference whose interval contains 0 (a ratio whose interval contains 1) is not resolved by the
items measured. Files whose settings measure the same prompts and windows (model, prompt count and offset,
new tokens, window count, length and prefix: not the calibration) are merged, so a main run and its
held-out-corpora pass pair as one; rows of files that measured other items are never paired.

    python benchmarks/fidelity_bootstrap.py runs/pc/results.json --pair "pp-prompt 20%" "griffin 27%" \\
        --pair "pp-prompt 40%" "griffin 53%" --out runs/pc/bootstrap.md
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

from ppframework.outputs import atomic_write_text

SetItems = list[tuple[float, float, int]]
"""One prompt set's prompts: (top-1, KL, tokens) each."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--help`` lists every option)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="prompt_conditioned.py results.json file(s)")
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"), help="methods")
    parser.add_argument("--batch", type=int, default=1, help="the rows' batch size (default 1)")
    parser.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    return parser.parse_args(argv)


ITEM_SETTINGS = (
    "model",
    "prompts",
    "prompt_offset",
    "new_tokens",
    "stop_at_eos",
    "windows",
    "window_len",
    "prefix_len",
    "window_policy",
    "window_bos",
    "mixed_batches",
)
"""The settings that fix which prompts and windows a results file measured (not the calibration)."""


def load_report(path: str) -> dict[str, Any]:
    """One results file (its ``settings`` and ``rows``)."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"results: {path} does not exist")
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"results: {path} is not JSON ({err})") from err
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
        raise SystemExit(f"results: {path} has no 'rows' list (is it a prompt_conditioned.py results.json?)")
    return report


def merged_rows(paths: list[str]) -> list[tuple[str, dict[tuple[str, int], dict[str, Any]]]]:
    """The files grouped by the settings that fix their items (:data:`ITEM_SETTINGS`), each group's rows
    merged: (the group's file names, (method label, batch size) -> row). A method measured in two files of
    one group (e.g. the prompt sets in one and held-out corpora in another) gets both files' measures;
    failed rows are left out."""
    groups: dict[str, tuple[list[str], dict[tuple[str, int], dict[str, Any]]]] = {}
    for path in paths:
        report = load_report(path)
        settings = report.get("settings") or {}
        key = json.dumps({name: settings.get(name) for name in ITEM_SETTINGS}, sort_keys=True)
        names, rows = groups.setdefault(key, ([], {}))
        names.append(Path(path).name)
        for row in report["rows"]:
            if "error" in row:
                continue
            merged = rows.setdefault(
                (row["method"], int(row["batch_size"])),
                {"method": row["method"], "fidelity": {}, "continuation_perplexity": {}},
            )
            merged["fidelity"].update(row.get("fidelity") or {})
            merged["continuation_perplexity"].update(row.get("continuation_perplexity") or {})
    return [(" + ".join(names), rows) for names, rows in groups.values()]


def set_items(row: dict[str, Any], name: str) -> SetItems:
    """The per-prompt (top-1, KL, tokens) of one prompt set of a row."""
    prompts = row["fidelity"][name].get("per_prompt")
    if not prompts:
        raise SystemExit(f"{row['method']}: prompt set {name!r} has no per-prompt figures")
    return [(float(p["top1"]), float(p["kl"]), int(p["tokens"])) for p in prompts]


def set_means(items: SetItems, draw: list[int]) -> tuple[float, float]:
    """Token-weighted (top-1, KL) of the drawn prompts of one set."""
    tokens = sum(items[i][2] for i in draw)
    if tokens == 0:
        return math.nan, math.nan
    top1 = sum(items[i][0] * items[i][2] for i in draw) / tokens
    kl = sum(items[i][1] * items[i][2] for i in draw) / tokens
    return top1, kl


def fidelity_means(sets: list[SetItems], draws: list[list[int]]) -> tuple[float, float]:
    """The unweighted mean over sets of each set's (top-1, KL) for the given draws."""
    pairs = [set_means(items, draw) for items, draw in zip(sets, draws, strict=True)]
    return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)


def percentile_interval(values: list[float], confidence: float) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of ``values``."""
    ordered = sorted(values)
    tail = (1.0 - confidence) / 2.0
    return ordered[int(tail * len(ordered))], ordered[min(len(ordered) - 1, int((1.0 - tail) * len(ordered)))]


def comparison(
    measure: str, items: str, a: float, b: float, effect: float, interval: tuple[float, float], kind: str
) -> dict[str, Any]:
    """One table row: A's and B's values, the effect (``difference`` A - B or ``ratio`` A / B) and its
    interval, resolved when the interval excludes no effect (0 for a difference, 1 for a ratio)."""
    low, high = interval
    null = 0.0 if kind == "difference" else 1.0
    return {
        "measure": measure,
        "items": items,
        "a": a,
        "b": b,
        "effect": effect,
        "low": low,
        "high": high,
        "resolved": low > null or high < null,
        "kind": kind,
    }


def compare_fidelity(
    a: dict[str, Any], b: dict[str, Any], resamples: int, confidence: float, seed: int
) -> list[dict[str, Any]]:
    """Top-1 and KL rows of one pair over the prompt sets both measured (same prompts required)."""
    names = [name for name in a["fidelity"] if name in b["fidelity"]]
    if not names:
        return []
    sets_a = [set_items(a, name) for name in names]
    sets_b = [set_items(b, name) for name in names]
    for name, items_a, items_b in zip(names, sets_a, sets_b, strict=True):
        if [t for *_, t in items_a] != [t for *_, t in items_b]:
            raise SystemExit(
                f"{a['method']} and {b['method']}: prompt set {name!r} has different prompts (token counts "
                "differ); compare rows of the same run settings"
            )
    rng = random.Random(seed)
    everything = [list(range(len(items))) for items in sets_a]
    top1_a, kl_a = fidelity_means(sets_a, everything)
    top1_b, kl_b = fidelity_means(sets_b, everything)
    top1_diffs, kl_diffs = [], []
    for _ in range(resamples):
        draws = [rng.choices(range(len(items)), k=len(items)) for items in sets_a]
        ta, ka = fidelity_means(sets_a, draws)
        tb, kb = fidelity_means(sets_b, draws)
        top1_diffs.append(ta - tb)
        kl_diffs.append(ka - kb)
    items = sum(len(s) for s in sets_a)
    label = f"{items} prompts ({', '.join(names)})"
    return [
        comparison(measure, label, va, vb, va - vb, percentile_interval(diffs, confidence), "difference")
        for measure, va, vb, diffs in (
            ("mean top-1", top1_a, top1_b, top1_diffs),
            ("mean KL", kl_a, kl_b, kl_diffs),
        )
    ]


def compare_continuation(
    a: dict[str, Any], b: dict[str, Any], resamples: int, confidence: float, seed: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Perplexity-ratio rows of one pair per corpus with per-window NLLs; and the corpora skipped."""
    rows, skipped = [], []
    for corpus, ca in a["continuation_perplexity"].items():
        cb = b["continuation_perplexity"].get(corpus)
        if cb is None:
            continue
        if "window_nll" not in ca or "window_nll" not in cb:
            skipped.append(f"{corpus} (no per-window NLL in these rows; rerun them)")
            continue
        na, nb = ca["window_nll"], cb["window_nll"]
        if len(na) != len(nb) or ca["tokens"] != cb["tokens"]:
            raise SystemExit(f"{a['method']} and {b['method']}: {corpus} was scored on different windows")
        per_window = ca["tokens"] / len(na)
        diffs = [x - y for x, y in zip(na, nb, strict=True)]
        rng = random.Random(seed)
        ratios = [
            math.exp(sum(rng.choices(diffs, k=len(diffs))) / (per_window * len(diffs)))
            for _ in range(resamples)
        ]
        rows.append(
            comparison(
                f"cont. ppl {corpus}",
                f"{len(na)} windows",
                ca["perplexity"],
                cb["perplexity"],
                ca["perplexity"] / cb["perplexity"],
                percentile_interval(ratios, confidence),
                "ratio",
            )
        )
    return rows, skipped


def markdown(lines: list[tuple[str, str, str, dict[str, Any]]], confidence: float) -> str:
    """The table: one line per file, pair and measure."""
    head = [
        f"| file | A | B | measure | items | A | B | A - B or A / B | {confidence:.0%} interval | resolved |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    body = []
    for file, a, b, row in lines:
        sign = "+" if row["kind"] == "difference" else ""
        effect = f"{row['effect']:{sign}.4f}" + (" (ratio)" if row["kind"] == "ratio" else "")
        interval = f"{row['low']:{sign}.4f} .. {row['high']:{sign}.4f}"
        body.append(
            f"| {file} | {a} | {b} | {row['measure']} | {row['items']} | {row['a']:.4f} | {row['b']:.4f} | "
            f"{effect} | {interval} | {'yes' if row['resolved'] else 'no'} |"
        )
    return "\n".join(head + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print (and with ``--out`` write) the table; 0 on success."""
    args = parse_args(argv)
    if not 0.0 < args.confidence < 1.0:
        raise SystemExit(f"--confidence: {args.confidence} is not between 0 and 1")
    if args.resamples < 100:
        raise SystemExit(
            f"--resamples: {args.resamples} is too few for a percentile interval (use 100 or more)"
        )
    lines: list[tuple[str, str, str, dict[str, Any]]] = []
    notes: list[str] = []
    for files, rows in merged_rows(args.results):
        for a, b in args.pair:
            if (a, args.batch) not in rows or (b, args.batch) not in rows:
                missing = [m for m in (a, b) if (m, args.batch) not in rows]
                known = sorted({method for method, batch in rows if batch == args.batch})
                notes.append(f"{files}: no row at batch {args.batch} for {', '.join(missing)} (has {known})")
                continue
            row_a, row_b = rows[(a, args.batch)], rows[(b, args.batch)]
            found = compare_fidelity(row_a, row_b, args.resamples, args.confidence, args.seed)
            ppl, skipped = compare_continuation(row_a, row_b, args.resamples, args.confidence, args.seed)
            notes.extend(f"{files}: {a} / {b}: skipped {s}" for s in skipped)
            lines.extend((files, a, b, row) for row in found + ppl)
    if not lines:
        raise SystemExit("no pair was found in any file:\n" + "\n".join(notes))
    text = markdown(lines, args.confidence)
    if notes:
        text += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    print(text, end="")
    if args.out:
        atomic_write_text(Path(args.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
