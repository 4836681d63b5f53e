"""Writing ``ppf run``'s report: the markdown table with its settings line, the CSV and the JSON."""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ppframework.outputs import atomic_write_text, remove_partial_results, results_stem, write_json
from ppframework.runner.results import MethodResult, RunReport

logger = logging.getLogger(__name__)


def window_bos_phrase(data: dict[str, Any]) -> str:
    """What ``data.window_bos`` does to each window, for settings lines (empty when off)."""
    return " (each BOS + seq_len - 1 text tokens)" if data.get("window_bos") else ""


def warmup_phrase(data: dict[str, Any]) -> str:
    """How the warm-up ran, for settings lines (``data`` is the dumped ``data`` section)."""
    n = data["warmup_batches"]
    if data.get("warmup_policy") == "untracked":
        return f"{n} untracked warm-up batch(es) (history unchanged; those batches scored again after)"
    return f"{n} warm-up batch(es) (not scored)"


def _parameter_split(resolved: dict[str, Any]) -> str:
    """``decoder 106.2M, embeddings 28.3M, other 0.0M of 134.5M parameters`` (from resolved settings)."""
    counts = resolved.get("parameters")
    if not counts:
        return "parameter counts not recorded"
    parts = ", ".join(f"{k} {counts[k] / 1e6:.1f}M" for k in ("decoder", "embeddings", "other"))
    return f"{parts} of {counts['model'] / 1e6:.1f}M parameters"


def format_table(report: RunReport) -> str:
    """The results as a markdown table, with the settings line that produced them."""
    s = report.settings
    r, d, c = s["resolved"], s["data"], s["calibration"]
    lines = [
        f"model {s['model']['name']} ({r['dtype']}, {r['device']}); data {d['name']}/{d['split']}, "
        f"seq_len {d['seq_len']}, batch {d['batch_size']}, "
        f"{d['window_policy']} windows{window_bos_phrase(d)}, "
        f"{r['scored_batches']} scored batch(es) after {warmup_phrase(d)}; "
        f"calibration {c['dataset']} x {c['n_samples']} windows; seed {s['seed']}",
        "",
        "| method | target ratio | per-layer ratio | realised ratio (decoder / model) | perplexity "
        "| Δ ppl vs dense | forward s (median) | time ratio (1 sequential pass) | FLOPs-ideal ratio "
        "| probe FLOPs share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        kind = " (static)" if row.static else ""
        if row.error:
            lines.append(f"| {row.method} | {row.target_ratio:.2f} | - | - | FAILED | - | - | - | - | - |")
            continue
        lines.append(
            f"| {row.method}{kind} | {row.target_ratio:.2f} | {_layer_ratio_cell(row)} "
            f"| {_realised_cell(row)} | {row.perplexity:.3f} "
            f"| {row.delta_perplexity:+.3f} "
            f"| {row.median_forward_s:.3f} "
            f"| {row.time_ratio:.3f}{' (!)' if row.time_below_ideal else ''} | {row.ideal_time_ratio:.3f} "
            f"| {row.probe_flops_share:.2%} |"
        )
    for row in report.failures:
        lines += ["", f"FAILED {row.method}: {row.error}"]
    lines += [
        "",
        "time ratio (1 sequential pass): every method was timed once, one after another, with no spread; "
        "not a speed-up measurement (`ppf eval` times interleaved dense/method pairs with their IQR).",
    ]
    if any(row.time_below_ideal for row in report.rows):
        lines.append("(!) below the FLOPs ideal: noise, not a result.")
    if not report.complete:
        lines += ["", "(partial results: the run has not finished)"]
    if s.get("note"):
        lines += ["", f"note: {s['note']}"]
    lines += [
        "",
        "per-layer ratio = the ratio each pruned block is given (min-max when the allocation gives "
        "blocks different ratios, as adaptive FLAP does). "
        "realised ratio = fraction of all decoder attention+MLP projection weights removed, mean over "
        "scored batches (skipped layers and dense key/value heads included in the total); / model = the "
        "same weights as a fraction of every parameter of the model, embeddings included "
        f"({_parameter_split(r)}). "
        "time ratio = median forward time / dense's, whole model incl. the unpruned LM head, timed "
        "sequentially in this process. FLOPs-ideal ratio = (pruned + probe + LM head FLOPs) / dense "
        "FLOPs of the whole forward; probe FLOPs share = probe FLOPs / dense decoder FLOPs.",
    ]
    return "\n".join(lines)


def _realised_cell(row: MethodResult) -> str:
    """``decoder / model``, or "dense prefill" for a method whose windows (prompts) run unpruned."""
    if row.dense_prefill and not row.realised_ratio:
        return "dense prefill"
    return f"{row.realised_ratio:.3f} / {row.realised_ratio_model:.3f}"


def _layer_ratio_cell(row: MethodResult) -> str:
    """``0.44``, or ``0.21-0.74`` when the blocks were given different ratios."""
    low, high = row.min_block_ratio, row.max_block_ratio
    if math.isfinite(low) and math.isfinite(high) and high - low > 1e-9:
        return f"{low:.2f}-{high:.2f}"
    return f"{row.layer_ratio:.2f}"


CSV_COLUMNS: tuple[str, ...] = (
    "method",
    "target_ratio",
    "layer_ratio",
    "realised_ratio",
    "perplexity",
    "delta_perplexity",
    "median_forward_s",
    "time_ratio",
    "ideal_time_ratio",
    "probe_flops_share",
    "static",
    "error",
    "min_block_ratio",
    "max_block_ratio",
    "realised_ratio_model",
)


def _csv_value(value: Any) -> Any:
    return "" if isinstance(value, float) and not math.isfinite(value) else value


def write_csv(report: RunReport, path: str | Path) -> Path:
    """One row per method with :data:`CSV_COLUMNS` (non-finite numbers left empty), written atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({key: _csv_value(value) for key, value in asdict(row).items()})
    return atomic_write_text(path, buffer.getvalue())


def write_report(report: RunReport, out_dir: str | Path) -> Path:
    """Write ``results.json`` (strict JSON: NaN/inf as null), ``results.csv`` and ``results.md`` into
    ``out_dir``, each atomically; return the JSON path.

    A partial report never replaces complete results: while ``results.json`` holds a finished run it
    goes to ``results.partial.*`` beside them instead (:func:`ppframework.outputs.results_stem`), and
    a complete report removes those.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(out, report.complete)
    path = write_json(out / f"{stem}.json", report.to_json())
    write_csv(report, out / f"{stem}.csv")
    atomic_write_text(out / f"{stem}.md", format_table(report) + "\n")
    if report.complete:
        remove_partial_results(out)
    return path


def try_write_report(report: RunReport, out_dir: str | Path) -> None:
    """:func:`write_report`, logging instead of raising when the folder cannot be written (the run
    goes on; the command line reports the final write's failure itself)."""
    try:
        write_report(report, out_dir)
    except OSError as exc:
        what = "the results" if report.complete else "partial results"
        logger.warning("could not write %s to %s: %s", what, out_dir, exc)


