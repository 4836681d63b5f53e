"""The paper's efficiency metric: performance degradation per unit of runtime reduction (PRR).

``PRR = (ppl_pruned - ppl_dense) / (1 - time_pruned / time_dense)``; lower is better. For accuracy
the degradation is the accuracy drop ``acc_dense - acc_pruned``. Methods are compared by
``PRR_baseline / PRR_method`` on the same model, data, batch and pruning ratio (the paper reports
2.56 for PP against FLAP at 40% on LLaMA-2-7B): above 1 means the method degrades less per unit of
runtime it saves.

Edge cases (all documented per function):

* not faster (``1 - time ratio <= 0``) and worse: PRR is ``math.inf`` (it pays in quality and saves
  nothing);
* not faster and not worse: PRR is NaN (undefined);
* faster and better than dense: PRR is negative; it is returned as is, but ratios of negative PRRs
  are meaningless and :func:`prr_ratios` gives NaN for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def prr_from_degradation(degradation: float, time_pruned: float, time_dense: float) -> float:
    """``degradation / (1 - time_pruned / time_dense)`` with the module's edge cases.

    Returns ``math.inf`` when the method is not faster (``1 - ratio <= 0``) and ``degradation > 0``;
    NaN when it is not faster and ``degradation <= 0``, or when an input is NaN.

    Raises:
        ValueError: ``time_dense`` is not positive.
    """
    if not time_dense > 0:
        raise ValueError(f"time_dense must be positive, got {time_dense}")
    if math.isnan(degradation) or math.isnan(time_pruned):
        return math.nan
    reduction = 1.0 - time_pruned / time_dense
    if reduction <= 0:
        return math.inf if degradation > 0 else math.nan
    return degradation / reduction


def prr(ppl_pruned: float, ppl_dense: float, time_pruned: float, time_dense: float) -> float:
    """Perplexity PRR: ``(ppl_pruned - ppl_dense) / (1 - time_pruned / time_dense)``; lower is better.

    ``math.inf`` when the pruned model is not faster but has a higher perplexity; NaN when it is
    neither faster nor worse; negative when it is faster and better.
    """
    return prr_from_degradation(ppl_pruned - ppl_dense, time_pruned, time_dense)


def accuracy_prr(acc_pruned: float, acc_dense: float, time_pruned: float, time_dense: float) -> float:
    """Accuracy PRR: ``(acc_dense - acc_pruned) / (1 - time_pruned / time_dense)``; lower is better.

    Accuracies may be fractions or percentages (the PRR has the same unit). Same edge cases as
    :func:`prr`.
    """
    return prr_from_degradation(acc_dense - acc_pruned, time_pruned, time_dense)


def prr_ratio(prr_baseline: float, prr_method: float) -> float:
    """``PRR_baseline / PRR_method``: how many times less the method degrades per unit of speed-up.

    Defined for PRRs in ``[0, inf]``:

    * NaN if either is NaN or negative (a method that got better while faster has no meaningful
      ratio);
    * 1.0 if both are 0 (both lossless); NaN if both are infinite (neither is faster);
    * ``inf`` if the method's PRR is 0 and the baseline's is not, or the baseline's is infinite and
      the method's finite;
    * 0.0 if the method's PRR is infinite and the baseline's finite;
    * otherwise the plain quotient.
    """
    b, m = float(prr_baseline), float(prr_method)
    if math.isnan(b) or math.isnan(m) or b < 0 or m < 0:
        return math.nan
    if math.isinf(b) and math.isinf(m):
        return math.nan
    if b == 0 and m == 0:
        return 1.0
    if m == 0 or math.isinf(b):
        return math.inf
    if math.isinf(m):
        return 0.0
    return b / m


def _field(row: Any, name: str) -> Any:
    if isinstance(row, Mapping):
        return row[name]
    return getattr(row, name)


def _prr_by_method(rows: Mapping[str, float] | Iterable[Any]) -> dict[str, float]:
    if isinstance(rows, Mapping):
        return {str(k): float(v) for k, v in rows.items()}
    out: dict[str, float] = {}
    for row in rows:
        method = str(_field(row, "method"))
        if method in out:
            raise ValueError(
                f"prr_ratios: method {method!r} appears twice; pass the rows of one setting "
                "(same model, data, batch and pruning ratio) at a time"
            )
        out[method] = float(_field(row, "prr"))
    return out


def prr_ratios(
    rows: Mapping[str, float] | Iterable[Any], baselines: Sequence[str]
) -> dict[tuple[str, str], float]:
    """``PRR_baseline / PRR_method`` for every method and every baseline of the same run.

    Args:
        rows: the PRR of each method for one setting (same model, data, batch and pruning ratio):
            a mapping ``method -> PRR`` or records (dicts or objects) with ``method`` and ``prr``.
        baselines: names of the baseline methods (e.g. ``("flap", "wanda-sp")``). Baselines with
            no row are skipped.

    Returns:
        ``{(method, baseline): ratio}`` for every method other than the baseline itself, with the
        inf/zero/negative conventions of :func:`prr_ratio`.

    Raises:
        ValueError: a method appears twice among the records.
    """
    by_method = _prr_by_method(rows)
    out: dict[tuple[str, str], float] = {}
    for baseline in baselines:
        if baseline not in by_method:
            continue
        for method, value in by_method.items():
            if method == baseline:
                continue
            out[(method, baseline)] = prr_ratio(by_method[baseline], value)
    return out
