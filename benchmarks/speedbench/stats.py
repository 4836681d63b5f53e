"""The speed benchmark's arithmetic on timings: ratios to a reference, the share of an ideal reached,
and differences paired per interleaved round (the direct measure of PP's overhead over a static
baseline with the same kept shapes)."""

from __future__ import annotations

import statistics
from typing import Any


def safe_ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is zero."""
    return a / b if b else float("nan")


def gain_fraction(speedup: float, ideal: float) -> float:
    """``(speedup - 1) / (ideal - 1)``: the share of the ideal speed gain measured (NaN: no ideal gain)."""
    return (speedup - 1.0) / (ideal - 1.0) if ideal > 1.0 else float("nan")


def realisation(measured: float, ideal: float) -> float:
    """``(1 - measured) / (1 - ideal)`` for time ratios: the share of the ideal saving measured (NaN: no
    ideal saving)."""
    return (1.0 - measured) / (1.0 - ideal) if ideal < 1.0 else float("nan")


def paired_difference(slower: list[float], faster: list[float], scale: float) -> dict[str, float]:
    """Median and quartiles of ``(slower[r] - faster[r]) / scale`` over the rounds ``r`` that timed
    both (interleaved rounds: a slow spell of the machine hits both calls of a round alike)."""
    diffs = [(a - b) / scale for a, b in zip(slower, faster, strict=True)]
    if not diffs:
        return {"median": float("nan"), "q25": float("nan"), "q75": float("nan"), "rounds": 0}
    q25, q50, q75 = (
        statistics.quantiles(diffs, n=4, method="inclusive") if len(diffs) > 1 else (diffs[0],) * 3
    )
    return {"median": q50, "q25": q25, "q75": q75, "rounds": len(diffs)}


def add_paired_overhead(rows: list[dict[str, Any]], dense_decoder_s: float) -> None:
    """Give every dynamic row its decoder time over each static row with the very same kept shapes
    (same target and realised ratio), paired per round, as shares of the dense decoder time.

    Both run the same sliced full pass, so the difference is what the dynamic method adds per
    batch, net of what its full pass reuses: the direct measure of PP's overhead (the stage
    profile's total minus the reused FLOPs is an estimate of the same thing).
    """
    static_rows = [r for r in rows if r["static"]]
    for row in rows:
        if row["static"] or row["target_ratio"] == 0:  # dense and the ratio-0 pipeline: nothing to pair
            continue
        paired = {}
        for static in static_rows:
            same_shapes = (
                static["target_ratio"] == row["target_ratio"]
                and abs(static["realised_ratio"] - row["realised_ratio"]) < 1e-9
            )
            if same_shapes:
                paired[static["variant"]] = paired_difference(
                    row["decoder"]["seconds"], static["decoder"]["seconds"], dense_decoder_s
                )
        if paired:
            row["over_static_paired"] = paired
