"""The generation benchmark's report as markdown: the main table, the per-generate overhead over a
static baseline, the decode target checked against the run, and the column legend."""

from __future__ import annotations

import math
from typing import Any

from .formatting import fmt, met, workload_words


def format_generation_markdown(report: dict[str, Any]) -> str:
    """The generation report as markdown: settings, main table, per-generate overhead, targets."""
    s = report["settings"]
    lines = [
        f"# Generation speed: {s['model']}",
        "",
        workload_words(s)
        + f"{s['threads']} thread(s). `model.generate`, greedy, {s['new_tokens']} new tokens "
        f"(min = max, no stop strings: 1 prefill + {s['decode_steps']} decode steps for every method), "
        f"KV cache, decode policy `{s['decode']}`; prompts: {s['prompts']} (batch B uses the first B); "
        f"batches {s['batches']}; skip layers {s['skip_layers']}, round_to {s['round_to']}; calibration: "
        f"{s['calibration']}; {s['repeats']} interleaved repeats after {s['warmup']} warm-up round(s) of "
        f"{s['warmup_new_tokens']} new tokens; torch {s['torch']}.",
        "",
        "| variant | batch | realised | prefill s | prefill ratio | decode tokens/s | decode speed-up "
        "| kept-bytes ideal | gain / ideal gain | speed-up / ideal "
        "| step-median speed-up (gain / ideal gain) | decoder layers: speed-up / ideal "
        "| KV read / dense weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        label = row["variant"] + (" (static)" if row["static"] else "")
        dense_bytes = row["weight_bytes_per_step"]["total"] * row["ideal_decode_speedup"]
        layers, steps = row["decode_decoder_layers"], row["decode_step_median"]
        lines.append(
            f"| {label} | {row['batch']} | {row['realised_ratio']:.3f} | {row['prefill']['median_s']:.4f} "
            f"| {row['prefill']['ratio']:.3f} | {row['decode_tokens_per_s']:.1f} "
            f"| {row['decode']['speedup']:.3f} | {row['ideal_decode_speedup']:.3f} "
            f"| {fmt(row['gain_fraction_of_ideal'], '.2f')} | {row['speedup_over_ideal']:.3f} "
            f"| {steps['speedup']:.3f} ({fmt(steps['gain_fraction_of_ideal'], '.2f')}) "
            f"| {layers['speedup']:.3f} / {layers['ideal_speedup']:.3f} "
            f"| {row['kv_cache_bytes_per_step'] / dense_bytes:.1%} |"
        )
    overhead_rows = [
        (row, static, o)
        for row in report["rows"]
        for static, o in row.get("per_generate_overhead_vs_static", {}).items()
    ]
    if overhead_rows:
        lines += [
            "",
            "The pipeline's per-generate overhead: a dynamic method's prefill (probe, scoring, fusion, "
            "masking, the one gather of the sliced weights its decode steps reuse, history update; under "
            "prefill: dense the prompt runs dense and the gather moves to the first decode step) against "
            "the static baseline's at the same ratio (decided once, sliced weights kept):",
            "",
            "| variant | batch | vs | pp prefill s | static prefill s | extra s | prefill ratio "
            "| share of dense prefill | share of dense generate |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        rows = {(r["variant"], r["batch"]): r for r in report["rows"]}
        for row, static, o in overhead_rows:
            other = rows[(f"{static} {row['variant'].rpartition(' ')[2]}", row["batch"])]
            lines.append(
                f"| {row['variant']} | {row['batch']} | {static} | {row['prefill']['median_s']:.4f} "
                f"| {other['prefill']['median_s']:.4f} | {o['seconds']:+.4f} | {o['prefill_ratio']:.3f} "
                f"| {o['share_of_dense_prefill']:+.1%} | {o['share_of_dense_generate']:+.2%} |"
            )
    lines += ["", *generation_target_lines(report)]
    lines += [
        "",
        "Columns: *realised* = fraction of decoder projection weights the decode steps skip (the prefill's "
        "masks); *prefill s* = median seconds of the prompt forward (probe, decision, gather included), "
        "*prefill ratio* = / dense's; *decode tokens/s* = batch x decode steps / median decode seconds "
        "(model forwards only, from forward hooks); *decode speed-up* = method tokens/s / dense tokens/s "
        "(> 1 = faster); *kept-bytes ideal* = weight bytes a dense decode step reads / those the method's "
        "step reads (decoder projections of the kept units, plus what every step reads in full: the LM "
        "head (the tied embedding matrix), norms and other parameters, and the batch's embedding rows); "
        "*gain / ideal gain* = (speed-up - 1) / (ideal - 1); *speed-up / ideal* = speed-up / ideal; "
        "*step-median speed-up* = dense's median decode-step seconds (pooled over every step of every "
        "repeat) / the method's: robust to bursts of load from other processes, which a whole-call sum "
        "is not; "
        "*decoder layers*: the decode steps' time inside the decoder layers alone (first layer's entry to "
        "last layer's exit), dense's / the method's, next to the projections-only bytes ideal; *KV "
        "read / dense weights* = mean cached key/value bytes a decode step attends over, / the dense "
        "step's weight bytes (not in the ideal).",
    ]
    return "\n".join(lines)


def generation_target_lines(report: dict[str, Any]) -> list[str]:
    """The issue's generation target, per pruned row: decode with frozen masks reaches >= 0.9 of the
    kept-weight (bytes) ideal gain (informational, never asserted)."""
    out = ["Target: decode tokens/s gain >= 0.9 of the kept-weight (bytes) ideal gain:"]
    for row in report["rows"]:
        fraction = row["gain_fraction_of_ideal"]
        if math.isnan(fraction):
            continue
        step = row["decode_step_median"]["gain_fraction_of_ideal"]
        out.append(
            f"- {row['variant']}, batch {row['batch']}: speed-up {row['decode']['speedup']:.3f} vs ideal "
            f"{row['ideal_decode_speedup']:.3f}, {fmt(fraction, '.2f')} of the ideal gain "
            f"({met(fraction >= 0.9)}); step median: speed-up {row['decode_step_median']['speedup']:.3f}, "
            f"{fmt(step, '.2f')} of the ideal gain ({met(step >= 0.9)})"
        )
    return out
