"""The efficiency frontier: perplexity against measured runtime, one curve per method.

``evaluation.frontier`` makes ``ppf eval`` run every listed method at every ratio, each timed in
interleaved pairs with dense (:func:`ppframework.evaluate.timing.time_against_dense`). This module turns
those rows into curves and answers the paper's question honestly: at the same measured runtime,
which method has the lower perplexity?

* A **curve** is one method's points ``(time ratio, perplexity)`` sorted by time ratio.
* Perplexity at a runtime between two measured points is interpolated linearly in log-perplexity
  against the time ratio; never extrapolated (outside a curve's measured range there is no value).
* The **baseline** is a static method: ``frontier.baseline`` when set, else the static method with
  the lowest perplexity at ``frontier.reference_ratio``.
* A method lies **below** the baseline where its interpolated perplexity is lower at the same time
  ratio, checked at every measured time ratio of either curve inside their common range.

Runtime points whose spread is at least their speed-up (:mod:`ppframework.metrics.noise`) are
counted and named: a verdict that rests on them is reported, with that caveat, not hidden.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ppframework.config import FrontierConfig, method_label
from ppframework.config.frontier import FLAP_BASELINES
from ppframework.evaluate.rows import EvalRow
from ppframework.formatting import format_number

__all__ = [
    "FrontierPoint",
    "Comparison",
    "FrontierReport",
    "analyse_frontier",
    "compare_curves",
    "format_frontier",
    "interpolate",
]

ORACLE_METHODS = frozenset({"full-batch"})
"""Methods shown as oracles (they probe the whole batch; their runtime is their real one)."""


@dataclass(frozen=True)
class FrontierPoint:
    """One method at one ratio: its measured time ratio (with quartiles) and perplexity."""

    ratio: float
    time_ratio: float
    perplexity: float
    time_q25: float | None = None
    time_q75: float | None = None
    unresolved: bool = False


def interpolate(curve: Sequence[FrontierPoint], time_ratio: float) -> float | None:
    """Perplexity of ``curve`` at ``time_ratio``: log-linear between the two measured neighbours.

    ``curve`` is sorted by time ratio. Returns None outside ``[first, last]`` time ratio (no
    extrapolation) or for an empty curve; at a measured time ratio, that point's perplexity (the
    lowest one if several points share it).
    """
    if not curve:
        return None
    lo, hi = curve[0].time_ratio, curve[-1].time_ratio
    if time_ratio < lo - 1e-12 or time_ratio > hi + 1e-12:
        return None
    exact = [p.perplexity for p in curve if math.isclose(p.time_ratio, time_ratio, abs_tol=1e-12)]
    if exact:
        return min(exact)
    for left, right in zip(curve, curve[1:], strict=False):
        if left.time_ratio <= time_ratio <= right.time_ratio:
            span = right.time_ratio - left.time_ratio
            weight = (time_ratio - left.time_ratio) / span
            log_ppl = (1 - weight) * math.log(left.perplexity) + weight * math.log(right.perplexity)
            return math.exp(log_ppl)
    return None  # pragma: no cover - unreachable for a sorted curve


@dataclass
class Comparison:
    """A method's curve against the baseline's at equal measured runtime."""

    method: str
    baseline: str
    #: (time ratio, method perplexity, baseline perplexity) at every measured time ratio of either
    #: curve inside their common range.
    at: list[tuple[float, float, float]] = field(default_factory=list)
    #: True: lower at every such runtime; False: not everywhere; None: the curves do not overlap.
    below_everywhere: bool | None = None
    #: points of either curve whose runtime spread is at least their speed-up.
    unresolved_points: int = 0

    @property
    def below_count(self) -> int:
        """Runtimes where the method is lower."""
        return sum(1 for _, m, b in self.at if m < b)


def compare_curves(
    method: str, curve: Sequence[FrontierPoint], baseline: str, base_curve: Sequence[FrontierPoint]
) -> Comparison:
    """Compare two curves (each sorted by time ratio) at equal runtime (see the module docstring)."""
    out = Comparison(method, baseline)
    out.unresolved_points = sum(p.unresolved for p in curve) + sum(p.unresolved for p in base_curve)
    if not curve or not base_curve:
        return out
    lo = max(curve[0].time_ratio, base_curve[0].time_ratio)
    hi = min(curve[-1].time_ratio, base_curve[-1].time_ratio)
    if lo > hi:
        return out
    times = sorted({p.time_ratio for p in (*curve, *base_curve) if lo <= p.time_ratio <= hi})
    for t in times:
        mine, theirs = interpolate(curve, t), interpolate(base_curve, t)
        if mine is not None and theirs is not None:
            out.at.append((t, mine, theirs))
    out.below_everywhere = all(m < b for _, m, b in out.at) if out.at else None
    return out


@dataclass
class FrontierReport:
    """Curves, the chosen baseline, comparisons and the reference-ratio efficiency of each method."""

    curves: dict[str, list[FrontierPoint]]
    static: dict[str, bool]
    baseline: str | None
    baseline_reason: str
    reference_ratio: float
    comparisons: dict[str, Comparison]
    #: method -> {"prr", "prr_ratio", "time_ratio", "unresolved"} at the reference ratio.
    reference: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "curves": {name: [asdict(p) for p in points] for name, points in self.curves.items()},
            "static": self.static,
            "baseline": self.baseline,
            "baseline_reason": self.baseline_reason,
            "reference_ratio": self.reference_ratio,
            "comparisons": {
                name: asdict(c) | {"below_count": c.below_count} for name, c in self.comparisons.items()
            },
            "reference": self.reference,
        }


def analyse_frontier(rows: Sequence[EvalRow], frontier: FrontierConfig) -> FrontierReport:
    """Build the curves from ``ppf eval``'s rows (labels ``<name> <ratio>%``) and compare them.

    Rows without a perplexity (a failed method, or perplexity off) are left out of the curves.
    """
    by_label = {r.method: r for r in rows}
    names = list(dict.fromkeys(frontier.method_name(e) for e in frontier.methods))
    curves: dict[str, list[FrontierPoint]] = {}
    static: dict[str, bool] = {}
    for name in names:
        points = []
        for ratio in frontier.ratios:
            row = by_label.get(method_label(name, ratio))
            if row is None or row.perplexity is None or row.time_ratio is None:  # not measured
                continue
            static[name] = static.get(name, False) or row.static
            points.append(
                FrontierPoint(
                    ratio=ratio,
                    time_ratio=row.time_ratio,
                    perplexity=row.perplexity,
                    time_q25=row.time_ratio_q25,
                    time_q75=row.time_ratio_q75,
                    unresolved=row.runtime_unresolved,
                )
            )
        curves[name] = sorted(points, key=lambda p: (p.time_ratio, p.ratio))
    baseline, reason = _pick_baseline(curves, static, frontier)
    comparisons = {}
    if baseline is not None:
        for name in names:
            if name != baseline:
                comparisons[name] = compare_curves(name, curves[name], baseline, curves[baseline])
    reference = {}
    for name in names:
        row = by_label.get(method_label(name, frontier.reference_ratio))
        if row is None:
            continue
        base_label = method_label(baseline, frontier.reference_ratio) if baseline else None
        reference[name] = {
            "time_ratio": row.time_ratio,
            "perplexity": row.perplexity,
            "prr": row.prr,
            "prr_ratio": row.prr_ratios.get(base_label) if base_label else None,
            # PRR_flap / PRR for both FLAPs (the paper's and FLAP's own) whenever the frontier has them
            "flap_prr_ratios": {
                flap: row.prr_ratios.get(method_label(flap, frontier.reference_ratio))
                for flap in FLAP_BASELINES
                if flap in names and flap != name
            },
            "unresolved": row.runtime_unresolved
            or bool(base_label and by_label.get(base_label) and by_label[base_label].runtime_unresolved),
        }
    return FrontierReport(curves, static, baseline, reason, frontier.reference_ratio, comparisons, reference)


def _pick_baseline(
    curves: dict[str, list[FrontierPoint]], static: dict[str, bool], frontier: FrontierConfig
) -> tuple[str | None, str]:
    if frontier.baseline is not None:
        if frontier.baseline not in curves:
            return None, f"evaluation.frontier.baseline {frontier.baseline!r} has no measured point"
        return frontier.baseline, "evaluation.frontier.baseline"
    at_reference = {
        name: p.perplexity
        for name, points in curves.items()
        if static.get(name)
        for p in points
        if math.isclose(p.ratio, frontier.reference_ratio)
    }
    if not at_reference:
        return None, f"no static method has a perplexity at {frontier.reference_ratio:.0%}"
    best = min(at_reference, key=at_reference.__getitem__)
    return best, f"the static method with the lowest perplexity at {frontier.reference_ratio:.0%}"


def _display(name: str) -> str:
    return f"{name} (oracle)" if name in ORACLE_METHODS else name


def format_frontier(report: FrontierReport) -> list[str]:
    """Markdown lines: the equal-runtime table, the verdicts, the reference-ratio efficiency."""
    lines = ["", "### Efficiency frontier"]
    if report.baseline is None:
        return lines + ["", f"no baseline to compare with: {report.baseline_reason}."]
    base = report.baseline
    base_curve = report.curves[base]
    others = [n for n in report.curves if n != base]
    lines += [
        "",
        f"Baseline: **{base}** ({report.baseline_reason}). Perplexity of each method at the measured "
        f"runtime of each {base} point (log-linear interpolation along the method's own measured curve; "
        "`-` = outside its measured runtime range).",
        "",
        f"| {base} ratio | time ratio | {base} | " + " | ".join(_display(n) for n in others) + " |",
        "|---|---|---|" + "---|" * len(others),
    ]
    for p in base_curve:
        cells = [format_number(interpolate(report.curves[n], p.time_ratio), ".2f") for n in others]
        mark = " \u26a0" if p.unresolved else ""
        lines.append(
            f"| {p.ratio:.0%} | {p.time_ratio:.3f}{mark} | {p.perplexity:.2f} | " + " | ".join(cells) + " |"
        )
    flaps = [f for f in FLAP_BASELINES if f in report.curves and f != base]
    lines += [
        "",
        f"| method | measured time ratios | below {base} at every common runtime? | PRR at "
        f"{report.reference_ratio:.0%} | PRR_{base} / PRR at {report.reference_ratio:.0%} | "
        + "".join(f"PRR_{f} / PRR | " for f in flaps)
        + "noisy points |",
        "|---|---|---|---|---|---|" + "---|" * len(flaps),
    ]
    for name in report.curves:
        curve = report.curves[name]
        span = f"{curve[0].time_ratio:.3f}-{curve[-1].time_ratio:.3f}" if curve else "-"
        ref = report.reference.get(name, {})
        if ref.get("unresolved"):
            prr_cell = ratio_cell = "\u26a0 noise"
        elif ref and ref["time_ratio"] is not None and ref["time_ratio"] >= 1.0:
            prr_cell = ratio_cell = "not faster"
        else:
            prr_cell, ratio_cell = (
                format_number(ref.get("prr"), ".2f"),
                format_number(ref.get("prr_ratio"), ".2f"),
            )
        if name == base:
            verdict, noisy, ratio_cell = "(baseline)", sum(p.unresolved for p in curve), "1.00"
        else:
            comparison = report.comparisons[name]
            noisy = comparison.unresolved_points
            if comparison.below_everywhere is None:
                verdict = "no common runtime range"
            else:
                word = "yes" if comparison.below_everywhere else "no"
                verdict = f"{word} ({comparison.below_count} of {len(comparison.at)} runtimes)"
        flap_cells = "".join(f"{_flap_cell(ref, f, name)} | " for f in flaps)
        cells = f"{prr_cell} | {ratio_cell} | {flap_cells}{noisy}"
        lines.append(f"| {_display(name)} | {span} | {verdict} | {cells} |")
    lines += [
        "",
        "Every point is timed in interleaved pairs with dense on the same batch; `time ratio` is the median "
        "method/dense time. Noisy points (\u26a0) have a runtime spread (IQR of the per-pair ratios) at "
        "least as large as their speed-up; a verdict that counts them can flip on a rerun.",
    ]
    return lines


def _flap_cell(ref: dict[str, Any], flap: str, name: str) -> str:
    """``PRR_flap / PRR`` of one method at the reference ratio (``1.00`` for that FLAP itself)."""
    if name == flap:
        return "1.00"
    if ref.get("unresolved"):
        return "\u26a0 noise"
    return format_number(ref.get("flap_prr_ratios", {}).get(flap), ".2f")
