"""``flap-ppcode``: FLAP's metric on the statistics the Probe Pruning code computes (the paper's FLAP).

``flap`` follows FLAP's semantics (each channel's variance around its mean). The PP code's statistics
differ at its calibration batch size ``B`` (:mod:`ppframework.calibration.ppcode_flap`): its running
baseline is the calibration mean divided by ``B``, so the fluctuation is the second moment around
``mean / B`` and the compensation bias is ``1 / B`` of FLAP's. Its head scores are the sums of the
channel scores clamped at the fp16 maximum, 65504 (``sort_attn_metric``), which ties the largest
heads (ties fall to the lower head index here). The channel score is FLAP's
``S_c = fluct_c * sum_i W[i, c]^2``, the statistic the history's ``channel_stats`` entry
:data:`FLUCTUATION`, filled by the calibration of any run whose
method scores with ``flap-ppcode``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ppframework.strategies.scoring import WeightMetricScore, fluctuation_times_weight, squared_weight_term

FLUCTUATION = "flap-ppcode:fluctuation"
"""(C,) the PP code's FLAP fluctuation summed over positions (its ``fluc_inp.sum(0)``), a history
``channel_stats`` entry."""
BASELINE = "flap-ppcode:fluctuation:mean"
"""(C,) the PP code's running baseline averaged over positions (its ``baseline_inp.mean(0)``): the
channel means of its bias compensation (fusion takes ``<statistic>:mean`` when the history has it)."""


class FlapPPCodeParams(BaseModel):
    """``flap-ppcode`` options."""

    model_config = ConfigDict(extra="forbid")

    bias_compensation: bool = Field(
        False,
        description="add W[:, pruned] @ baseline[pruned] to the block output, with the PP code's running "
        "baseline (the calibration mean / the calibration batch size)",
    )
    fp16_clamp: bool = Field(
        True, description="clamp head sums at the fp16 maximum 65504, as the PP code (false: plain sums)"
    )


class FlapPPCodeScore(WeightMetricScore):
    """FLAP as the PP code computes it: ``S_c = fluc_c * sum_i W[i, c]^2`` with the PP code's
    fluctuation, heads by their sum clamped at 65504, bias from the PP code's baseline."""

    name = "flap-ppcode"
    head_reduce = "sum-fp16"
    statistic = FLUCTUATION
    Params = FlapPPCodeParams
    weight_term = staticmethod(squared_weight_term)
    combine = staticmethod(fluctuation_times_weight)
    #: the calibration pass this metric needs beyond the dense means
    calibration_statistics = ("flap-ppcode",)

    def __init__(self, params: FlapPPCodeParams | None = None) -> None:
        super().__init__()
        self.params = params or FlapPPCodeParams()
        self.bias_compensation = self.params.bias_compensation
        self.head_reduce = "sum-fp16" if self.params.fp16_clamp else "sum"
