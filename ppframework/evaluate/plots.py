"""The PNG plots of ``ppf eval``: quality (perplexity, accuracy, generation scores, fidelity) against runtime.

Each plot is written atomically; rows without a measured runtime have no point.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ppframework.evaluate.efficiency import accuracy_source
from ppframework.evaluate.report import EvalReport
from ppframework.evaluate.rows import EvalRow
from ppframework.generation.fidelity_eval import mean_top1
from ppframework.outputs import atomic_path


def _main_metric(task: str) -> str:
    return "rougeL" if task == "xsum" else "pass@1"


def _runtime_point(row: EvalRow, method: str, value: float | None) -> dict[str, Any]:
    """A plot point on the measured-runtime axis, with its spread and noise flag."""
    return {
        "method": method,
        "ratio": row.target_ratio,
        "time_ratio": row.time_ratio,
        "value": value,
        "time_q25": row.time_ratio_q25,
        "time_q75": row.time_ratio_q75,
        "unresolved": row.runtime_unresolved,
    }


def write_plots(report: EvalReport, out: Path, plot: Callable[..., Path] | None = None) -> list[str]:
    """Perplexity (and mean accuracy) against runtime reduction, one marker per method and ratio."""
    if plot is None:
        from ppframework.plotting import plot_quality_vs_speed as plot
    written = []

    def draw(points: list[dict[str, Any]], name: str, *args: Any, **kwargs: Any) -> Path:
        target = out / name
        with atomic_path(target) as tmp:  # a crash mid-plot never leaves a broken PNG behind
            plot(points, tmp, *args, **kwargs)
        return target

    def family(row: EvalRow) -> str:
        return row.method.rsplit(" ", 1)[0] if row.method != "dense" else "dense"

    timed = [r for r in report.rows if r.time_ratio is not None]  # an unmeasured runtime has no point
    if len(timed) > 1 and all(r.perplexity is not None for r in timed):
        points = [_runtime_point(r, family(r), r.perplexity) for r in timed]
        path = draw(points, "perplexity_vs_runtime.png", "perplexity", "perplexity vs runtime", log_y=True)
        written.append(str(path))
    accuracy = accuracy_source(report.rows)
    if accuracy is not None and len(timed) > 1 and all(getattr(r, accuracy) is not None for r in timed):
        points = [_runtime_point(r, family(r), getattr(r, accuracy)) for r in timed]
        ylabel = "mean zero-shot accuracy" + (" (lm-eval)" if accuracy == "lm_eval_mean_acc" else "")
        path = draw(points, "accuracy_vs_runtime.png", ylabel, "accuracy vs runtime")
        written.append(str(path))
    for task in report.rows[0].generation if report.rows else {}:
        metric = _main_metric(task)
        points = []
        for r in report.rows:
            g = r.generation.get(task)
            if g is None or not g.get("decode_tps_ratio"):
                continue
            points.append(
                {
                    "method": family(r),
                    "ratio": r.target_ratio,
                    "time_ratio": 1.0 / g["decode_tps_ratio"],
                    "value": g["metrics"][metric],
                }
            )
        if len(points) == len(report.rows):
            path = draw(points, f"{task}_vs_decode_runtime.png", f"{task} {metric}", f"{task} vs decode time")
            written.append(str(path))
    # The generation frontier: a row without a measured time (or without fidelity) has no point.
    faithful = [r for r in timed if mean_top1(r.fidelity) is not None]
    if len(faithful) > 1 and faithful[0].method == "dense":
        from ppframework.plotting import plot_fidelity_vs_runtime

        points = [_runtime_point(r, family(r), mean_top1(r.fidelity)) for r in faithful]
        target = out / "fidelity_vs_runtime.png"
        with atomic_path(target) as tmp:
            plot_fidelity_vs_runtime(points, tmp)
        written.append(str(target))
    return written
