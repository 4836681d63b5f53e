"""results.csv: ``ppf eval``'s rows as CSV, fixed leading columns, then one per task and metric."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from typing import Any

from ppframework.evaluate.rows import EvalRow
from ppframework.generation.fidelity_eval import mean_top1

EVAL_CSV_COLUMNS: tuple[str, ...] = (
    "method",
    "target_ratio",
    "realised_ratio",
    "realised_ratio_model",
    "decode_realised_ratio",
    "static",
    "perplexity",
    "mean_acc",
    "mean_acc_norm",
    "time_ratio",
    "time_ratio_spread",
    "time_ratio_q25",
    "time_ratio_q75",
    "runtime_unresolved",
    "decoder_time_ratio",
    "ideal_time_ratio",
    "probe_flops_share",
    "tokens_per_s",
    "peak_memory_bytes",
    "prr",
    "accuracy_prr",
    "lm_eval_mean_acc",
)


def _csv_row(row: EvalRow) -> dict[str, Any]:
    out = {k: v for k, v in asdict(row).items() if k in EVAL_CSV_COLUMNS}
    out["ideal_time_ratio"] = row.ideal_time_ratio
    unmeasured = 0.0 if row.method == "dense" else None  # dense probes nothing; a method: not counted
    out["probe_flops_share"] = row.flops.get("probe_share") if row.flops else unmeasured
    for task, values in row.accuracy.items():
        out[f"acc_{task}"] = values["acc"]
        if values.get("acc_norm") is not None:
            out[f"acc_norm_{task}"] = values["acc_norm"]
    for task, metrics in row.lm_eval.items():
        for metric, value in metrics.items():
            out[f"lm_eval_{task}_{metric}"] = value
    for name, value in row.prr_ratios.items():
        out[f"prr_ratio_vs_{name}"] = value
    for task, g in row.generation.items():
        for metric, value in g["metrics"].items():
            out[f"gen_{task}_{metric}"] = value
        for key in ("decode_tokens_per_s", "decode_tps_ratio", "prefill_s", "n_items"):
            out[f"gen_{task}_{key}"] = g[key]
    if row.fidelity is not None:
        out["fid_mean_top1"] = mean_top1(row.fidelity)
        for name, scores in row.fidelity["prompt_sets"].items():
            out[f"fid_{name}_top1"] = None if scores is None else scores["top1"]
            out[f"fid_{name}_kl"] = None if scores is None else scores["kl"]
        for name, ppl in row.fidelity["continuation_perplexity"].items():
            out[f"cont_ppl_{name}"] = None if ppl is None else ppl["perplexity"]
    return out


def csv_text(rows: list[EvalRow]) -> str:
    """results.csv: the columns of :data:`EVAL_CSV_COLUMNS` first, then every other column any row has
    (per task and metric), sorted; a cell a row lacks stays empty."""
    records = [_csv_row(r) for r in rows]
    columns = list(EVAL_CSV_COLUMNS) + sorted({k for r in records for k in r} - set(EVAL_CSV_COLUMNS))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()
