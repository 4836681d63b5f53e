"""``score_channels`` strategy ``taylor``: LLM-Pruner-style gradient (Taylor) importance, static.

The scores come from one gradient pass over the calibration windows
(:mod:`ppframework.calibration.taylor`), stored per channel in the calibration history; the fusion
stage ``history-only`` hands the chosen variant over as ``a_c`` and the score is ``a_c`` itself
(no weight term: the weights are already in the salience). Heads are scored by the sum over their
channels, i.e. over the head's coupled weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ppframework.hookspecs import hookimpl
from ppframework.types import BlockContext, ChannelScores, Probe


def statistic_name(order: str, reduce: str) -> str:
    """The history statistic of one Taylor variant: ``taylor:<order>:<reduce>`` (the calibration
    computes it, :mod:`ppframework.calibration.taylor`; the strategy reads it)."""
    return f"taylor:{order}:{reduce}"


class TaylorParams(BaseModel):
    """Which LLM-Pruner variant scores the units (defaults: LLM-Pruner's ``param_first``)."""

    model_config = ConfigDict(extra="forbid")

    order: Literal["first", "second", "mix"] = Field(
        "first",
        description="first: s = w * dL/dw; second: s = w^2 * F / 2 with F the mean squared per-batch "
        "gradient (diagonal Fisher); mix: the first-order minus the second-order term",
    )
    reduce: Literal["element", "vector"] = Field(
        "element",
        description="element: sum of |s| over the unit's coupled weights; vector: |sum of s| over them "
        "(a head's whole group for attention)",
    )


def salience_only(activation: torch.Tensor | None, weight_term: torch.Tensor) -> torch.Tensor:
    """The Taylor score is the calibration salience itself (``weight_term`` is all ones)."""
    if activation is None:
        raise ValueError(
            "the 'taylor' metric needs its calibration statistic as the activation; use fuse_history "
            "'history-only' with history.init 'calibration'"
        )
    return activation * weight_term


class TaylorScore:
    """LLM-Pruner's Taylor importance (first-, second-order or mixed; element-wise or grouped)."""

    stage = "score_channels"
    name = "taylor"
    Params = TaylorParams
    #: the calibration pass this metric needs beyond the dense means
    calibration_statistics = ("taylor",)

    def __init__(self, params: TaylorParams | None = None) -> None:
        self.params = params or TaylorParams()
        self.statistic = statistic_name(self.params.order, self.params.reduce)

    @hookimpl
    def score_channels(
        self, ctx: BlockContext, probe: Probe | None, probe_states: torch.Tensor | None, weight: torch.Tensor
    ) -> ChannelScores:
        return ChannelScores(
            weight_term=torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device),
            combine=salience_only,
            head_reduce="sum",
            metric=self.name,
            statistic=self.statistic,
            out_weight=weight,
        )
