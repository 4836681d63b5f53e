"""Dynamic Wanda: Wanda-sp's metric, ``S_c = sum_i |W[i, c]| * sqrt(a_c)``, from the probe and the history.

The static ``wanda-sp`` strategy decides once from the calibration history. ``wanda`` is the same
metric as a ``score_channels`` strategy for a dynamic method: it attaches the probe's evidence (the
mean over probe rows of ``X^2`` per probed position, as PPsp), so any fusion builds ``a_c`` from probe
and history exactly as for PPsp, and only the metric changes (``sqrt(a_c)`` times the L1 norm of the
weight column, instead of ``a_c`` times the L2 norm of its squares). The PP code computes the same
dynamic metric (``HiddenRepresentationPruning.cal_*_prune_metric``, ``wandasp`` branch).

Options: the head reduction (Wanda-sp's ``sum``, or ``l2``), ``output_gain`` (fold the block's
output gain into the weight term, :mod:`ppframework.strategies.output_aware`) and FLAP's bias
compensation (``bias_compensation``, means from the calibration or the probe, as PPsp's option).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ppframework.strategies.scoring import (
    CompensationParams,
    WeightMetricScore,
    magnitude_weight_term,
    sqrt_activation_times_weight,
)


class WandaParams(CompensationParams):
    """Dynamic Wanda's options (the defaults are Wanda-sp's metric)."""

    head_reduce: Literal["sum", "l2"] = Field(
        "sum", description="how a head's channel scores make its score: sum (Wanda-sp) or l2 (PPsp's)"
    )
    output_gain: bool = Field(
        False,
        description="fold the block's output gain (Gemma 3's post-norm weights; identity elsewhere) into "
        "the weight term: sum_i |g_i W[i, c]|",
    )


class WandaScore(WeightMetricScore):
    """Wanda-sp's metric for dynamic methods: probe evidence per position, ``sqrt(a_c) * sum_i |W[i,c]|``."""

    name = "wanda"
    Params = WandaParams
    weight_term = staticmethod(magnitude_weight_term)
    combine = staticmethod(sqrt_activation_times_weight)

    def __init__(self, params: WandaParams | None = None) -> None:
        super().__init__()
        self.params = params or WandaParams()
        self.head_reduce = self.params.head_reduce
        self.output_gain = self.params.output_gain
        self.bias_compensation = self.params.bias_compensation
        self.compensation_mean = self.params.compensation_mean
