"""The efficiency metric of ``ppf eval``: PRR (perplexity and accuracy) and its ratios against the baselines.

Which methods are baselines (:func:`default_baselines`), which mean accuracy the accuracy PRR uses
(:func:`accuracy_source`), and :func:`add_efficiency`, which fills both PRRs and the ratios
``PRR_baseline / PRR_method`` on the rows.
"""

from __future__ import annotations

import math

from ppframework.config import MethodConfig
from ppframework.evaluate.rows import EvalRow
from ppframework.metrics.efficiency import accuracy_prr, prr, prr_ratio


def default_baselines(methods: list[MethodConfig], static: dict[str, bool]) -> list[str]:
    """Every static method of the run (by label)."""
    return [m.label for m in methods if static.get(m.label)]


def add_efficiency(rows: list[EvalRow], baselines: list[str]) -> None:
    """Fill PRR (perplexity and accuracy) and the ratios ``PRR_baseline / PRR_method``.

    Ratios are taken against every baseline of the run that has the same target ratio as the
    method (the paper compares PP 40% with FLAP 40%).
    """
    dense = rows[0]
    accuracy = accuracy_source(rows)
    for row in rows[1:]:
        if row.time_ratio is None:  # runtime not measured: no PRR
            continue
        if row.perplexity is not None and dense.perplexity is not None:
            row.prr = prr(row.perplexity, dense.perplexity, row.time_ratio, 1.0)
        if accuracy is not None and getattr(row, accuracy) is not None:
            row.accuracy_prr = accuracy_prr(
                getattr(row, accuracy), getattr(dense, accuracy), row.time_ratio, 1.0
            )
    by_label = {r.method: r for r in rows}
    for row in rows[1:]:
        for name in baselines:
            base = by_label.get(name)
            if base is None or base is row or not math.isclose(base.target_ratio, row.target_ratio):
                continue
            if row.prr is not None and base.prr is not None:
                row.prr_ratios[name] = prr_ratio(base.prr, row.prr)
            if row.accuracy_prr is not None and base.accuracy_prr is not None:
                row.accuracy_prr_ratios[name] = prr_ratio(base.accuracy_prr, row.accuracy_prr)


def accuracy_source(rows: list[EvalRow]) -> str | None:
    """The mean accuracy the accuracy PRR and plot use: the built-in scorer's ``mean_acc`` when it ran,
    else the harness's ``lm_eval_mean_acc``; None when dense has neither."""
    if not rows:
        return None
    for name in ("mean_acc", "lm_eval_mean_acc"):
        if getattr(rows[0], name) is not None:
            return name
    return None
