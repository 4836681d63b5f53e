"""Is a measured runtime difference real, or noise? Verdicts for interleaved time ratios.

A time ratio is the median of method/dense forward times over interleaved pairs on the same batch.
On a busy machine the pairs scatter; their interquartile range (IQR) says how much. A comparison is
*unresolved* when that spread is at least as large as the difference it reports: the distance of the
ratio from 1 (dense), or from another method's ratio. Reports then show the number flagged, with
advice, instead of a confident figure (a PRR or a PRR ratio built on it inherits the flag).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "NOISE_ADVICE",
    "RatioSpread",
    "ratio_spread",
    "speedup_unresolved",
]

NOISE_ADVICE = (
    "the runtime spread is at least as large as the difference it reports: re-run with more "
    "evaluation.runtime.repeats, one thread per process (`ppf --threads 1 ...`), nothing else running, "
    "or on a quieter machine"
)
"""What a flagged comparison tells the user to do."""


@dataclass(frozen=True)
class RatioSpread:
    """Median and quartiles of per-pair time ratios (method / dense of the same interleaved pair)."""

    median: float
    q25: float
    q75: float
    pairs: int

    @property
    def iqr(self) -> float:
        """``q75 - q25`` (0 for a single pair)."""
        return self.q75 - self.q25


def ratio_spread(method_s: Sequence[float], dense_s: Sequence[float]) -> RatioSpread:
    """Quartiles of ``method_s[i] / dense_s[i]`` over the pairs (NaN when there are none).

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(method_s) != len(dense_s):
        raise ValueError(f"ratio_spread: {len(method_s)} method times for {len(dense_s)} dense times")
    ratios = [m / d for m, d in zip(method_s, dense_s, strict=True) if d > 0]
    if not ratios:
        return RatioSpread(math.nan, math.nan, math.nan, 0)
    if len(ratios) == 1:
        return RatioSpread(ratios[0], ratios[0], ratios[0], 1)
    q25, q50, q75 = statistics.quantiles(ratios, n=4, method="inclusive")
    return RatioSpread(q50, q25, q75, len(ratios))


def speedup_unresolved(time_ratio: float, iqr: float) -> bool:
    """True when the runtime reduction ``1 - time_ratio`` is not larger than the spread ``iqr``.

    A method measured slower than dense (``time_ratio >= 1``) is unresolved too when the spread
    covers the difference; when it does not, the slow-down is real and not flagged here. NaN inputs
    count as unresolved.
    """
    if math.isnan(time_ratio) or math.isnan(iqr):
        return True
    return iqr >= abs(1.0 - time_ratio)
