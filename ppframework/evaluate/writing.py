"""Writing ``ppf eval``'s files: results.json, results.csv, results.md, generations.jsonl and the plots.

Each file is written atomically; a partial report (written after each method) never replaces complete
results.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ppframework.evaluate.csv_rows import csv_text
from ppframework.evaluate.plots import write_plots
from ppframework.evaluate.report import EvalReport
from ppframework.evaluate.tables import format_eval_table
from ppframework.outputs import atomic_write_text, remove_partial_results, results_stem, write_json


def generations_file(stem: str) -> str:
    """The name of the completions file beside ``<stem>.json``."""
    return "generations.jsonl" if stem == "results" else f"{stem}.generations.jsonl"


def write_eval_report(
    report: EvalReport, out_dir: str | Path, plot: Callable[..., Path] | None = None, plots: bool = True
) -> Path:
    """Write results.json (strict JSON: NaN/inf as null), results.csv, results.md and the PNG plots
    into ``out_dir``, each file atomically (a temporary file in the folder, then ``os.replace``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(out, report.complete)  # a partial report never replaces complete results
    if plots and report.settings["evaluation"]["plot"]:
        report.plots = write_plots(report, out, plot)
    path = write_json(out / f"{stem}.json", report.to_json())
    atomic_write_text(out / f"{stem}.csv", csv_text(report.rows))
    atomic_write_text(out / f"{stem}.md", format_eval_table(report) + "\n")
    if report.generations:
        lines = [json.dumps(record, ensure_ascii=False) for record in report.generations]
        atomic_write_text(out / generations_file(stem), "\n".join(lines) + "\n")
    if report.complete:
        remove_partial_results(out)
    return path
