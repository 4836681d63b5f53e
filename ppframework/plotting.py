"""Quality-versus-speed plots for evaluation and benchmark reports (matplotlib, Agg, no display)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DENSE_NAMES = frozenset({"dense", "none", "unpruned"})

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p")


@dataclass
class QualitySpeedPoint:
    """One run: ``method`` at pruning ``ratio`` took ``time_ratio`` x the dense time and scored ``value``."""

    method: str
    ratio: float
    time_ratio: float
    value: float
    #: quartiles of the per-pair time ratios (drawn as an error bar on the runtime axis), if known.
    time_q25: float | None = None
    time_q75: float | None = None
    #: the spread is at least the speed-up it reports (drawn hollow and named in the legend).
    unresolved: bool = False


def _optional(row: Any, key: str) -> Any:
    if isinstance(row, dict):
        return row.get(key)
    return getattr(row, key, None)


def _point(row: Any) -> QualitySpeedPoint:
    if isinstance(row, QualitySpeedPoint):
        return row
    get = row.__getitem__ if isinstance(row, dict) else lambda key: getattr(row, key)
    try:
        q25, q75 = _optional(row, "time_q25"), _optional(row, "time_q75")
        return QualitySpeedPoint(
            method=str(get("method")),
            ratio=float(get("ratio")),
            time_ratio=float(get("time_ratio")),
            value=float(get("value")),
            time_q25=None if q25 is None else float(q25),
            time_q75=None if q75 is None else float(q75),
            unresolved=bool(_optional(row, "unresolved")),
        )
    except (KeyError, AttributeError) as err:
        raise ValueError(
            f"plot_quality_vs_speed: each row needs method, ratio, time_ratio and value; got {row!r}"
        ) from err


def _x_error(points: list[QualitySpeedPoint], reduction: bool = True) -> list[list[float]] | None:
    """Asymmetric x error bars from the time-ratio quartiles, or None: on the runtime reduction axis
    (``reduction``) or on the time-ratio axis."""
    if not any(p.time_q25 is not None and p.time_q75 is not None for p in points):
        return None
    low, high = [], []
    for p in points:
        if p.time_q25 is None or p.time_q75 is None:
            low.append(0.0)
            high.append(0.0)
            continue
        slower, faster = max(0.0, p.time_q75 - p.time_ratio), max(0.0, p.time_ratio - p.time_q25)
        # x = 1 - time_ratio: a slower quartile (q75) lies to the left; x = time_ratio: to the right.
        low.append(slower if reduction else faster)
        high.append(faster if reduction else slower)
    return [low, high]


def _is_dense(point: QualitySpeedPoint) -> bool:
    return point.method.lower() in DENSE_NAMES


def plot_quality_vs_speed(
    rows: Iterable[Any],
    path: str | Path,
    metric_label: str = "perplexity",
    title: str | None = None,
    *,
    log_y: bool = False,
    x_axis: Literal["reduction", "time_ratio"] = "reduction",
) -> Path:
    """Write a PNG of quality against runtime reduction and return its path.

    x is the runtime reduction ``1 - time_ratio`` (time relative to dense), y the metric. Rows with
    ``time_q25``/``time_q75`` get error bars on x (the interquartile range of the per-pair time
    ratios); rows with ``unresolved`` set are drawn hollow and labelled "(noise)". Each method
    gets its own marker and colour with one point per pruning ratio, joined in order of ratio and
    annotated with the ratio; the dense run (method ``dense``) is drawn as a star at x = 0 and a
    dashed horizontal reference line.

    Args:
        rows: dicts, objects or :class:`QualitySpeedPoint` with ``method``, ``ratio`` (pruning ratio,
            0..1), ``time_ratio`` (time / dense time) and ``value``.
        path: output file (parent folders are created).
        metric_label: y-axis label (e.g. ``"WikiText-2 perplexity"`` or ``"mean accuracy"``).
        title: figure title.
        log_y: logarithmic y axis (useful for perplexities spanning decades).
        x_axis: ``"reduction"`` (``1 - time_ratio``, dense at 0) or ``"time_ratio"`` (time relative to
            dense, dense at 1).

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: a row lacks a field, or there are no rows.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError as err:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("plot_quality_vs_speed needs matplotlib: pip install matplotlib") from err

    points = [_point(row) for row in rows]
    if not points:
        raise ValueError("plot_quality_vs_speed: no rows to plot")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)

    # Figure + Agg canvas directly: no pyplot global state, no backend switching.
    fig = Figure(figsize=(7.0, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    reduction = x_axis == "reduction"

    def x_of(p: QualitySpeedPoint) -> float:
        return 1.0 - p.time_ratio if reduction else p.time_ratio

    dense = [p for p in points if _is_dense(p)]
    for p in dense[:1]:
        ax.axhline(p.value, color="0.4", linestyle="--", linewidth=1.0, label=f"dense ({p.value:.4g})")
        ax.scatter([x_of(p)], [p.value], marker="*", s=140, color="black", zorder=3)

    methods = list(dict.fromkeys(p.method for p in points if not _is_dense(p)))
    for index, method in enumerate(methods):
        mine = sorted((p for p in points if p.method == method), key=lambda p: p.ratio)
        xs = [x_of(p) for p in mine]
        ys = [p.value for p in mine]
        marker = _MARKERS[index % len(_MARKERS)]
        (line,) = ax.plot(
            xs, ys, marker=marker, linestyle="-", linewidth=1.0, markersize=7, label=method, zorder=2
        )
        xerr = _x_error(mine, reduction)
        if xerr is not None:
            ax.errorbar(xs, ys, xerr=xerr, fmt="none", ecolor=line.get_color(), elinewidth=0.8, capsize=3)
        for p, x, y in zip(mine, xs, ys, strict=True):
            label = f"{p.ratio:.0%}" + (" (noise)" if p.unresolved else "")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
            if p.unresolved:  # hollow: the spread is at least the speed-up this point claims
                ax.scatter(
                    [x],
                    [y],
                    marker=marker,
                    s=90,
                    facecolors="white",
                    edgecolors=line.get_color(),
                    linewidths=1.5,
                    zorder=4,
                )
    if any(p.unresolved for p in points):
        ax.scatter(
            [],
            [],
            marker="o",
            facecolors="white",
            edgecolors="black",
            label="hollow: runtime spread >= speed-up (noise)",
        )

    ax.set_xlabel("runtime reduction (1 - time / dense time)" if reduction else "time / dense time")
    ax.set_ylabel(metric_label)
    if log_y:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _pos: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def plot_fidelity_vs_runtime(rows: Iterable[Any], path: str | Path, title: str | None = None) -> Path:
    """Write the generation frontier: mean top-1 agreement with dense against time relative to dense.

    Rows as for :func:`plot_quality_vs_speed` (``value`` = the mean top-1 agreement over the prompt
    sets, ``time_ratio`` = the measured time / dense time): one curve per method family joined in order
    of pruning ratio, dense as a star at its own point (time 1, agreement 1) with a dashed reference
    line; time-ratio quartiles as x error bars, unresolved timings hollow.
    """
    return plot_quality_vs_speed(
        rows,
        path,
        "mean top-1 agreement with dense",
        title or "fidelity to dense vs runtime",
        x_axis="time_ratio",
    )
