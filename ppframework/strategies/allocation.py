"""``allocate`` strategies: how much each pruned block keeps (the method's structure).

``uniform`` gives every pruned block the same per-layer ratio ``p'`` (the target inflated for
skipped layers), as PP and every preset except ``flap`` do. ``adaptive`` is FLAP's adaptive
structure search ("AL-AM", An et al., AAAI 2024): each block's channel scores are standardised
within the block, attention heads take the mean of their channels' standardised scores, and one
global threshold over every pruned block of both kinds decides how many units each block keeps,
so that the pruned units cost the target share of the pruned blocks' FLOPs (or parameters).
``adaptive-calibration`` is the same structure decided from the calibration history's scores when
the pipeline attaches, so dynamic methods (a probe, a moving history) can use it too.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ppframework.hookspecs import hookimpl
from ppframework.types import AllocationContext, BlockKey, BlockKind, ChannelScores

logger = logging.getLogger(__name__)


def standardise(values: torch.Tensor) -> torch.Tensor:
    """``(x - mean(x)) / std(x)`` in float64, ``std`` the unbiased (N-1) one, as FLAP's code.

    A block whose scores are all equal (or that has one unit) has no spread; it gets zeros
    (FLAP's formula would divide by zero).
    """
    x = values.detach().to(torch.float64).flatten()
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    if not bool(torch.isfinite(std)) or float(std) == 0.0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def standardised_unit_scores(scores: ChannelScores, kind: BlockKind, unit_width: int) -> torch.Tensor:
    """One block's unit scores for the global selection: its channel scores standardised within the
    block; an attention head takes the mean of its channels' standardised scores."""
    z = standardise(scores.channel_scores())
    if BlockKind(kind) is BlockKind.ATTENTION:
        return z.view(-1, unit_width).mean(dim=1)
    return z


def global_threshold(
    values: torch.Tensor, costs: torch.Tensor, prune_share: float, rule: str = "pp"
) -> float:
    """The threshold of the global selection over ``values`` (N,) with unit ``costs`` (N,).

    ``pp`` (the PP paper's code, ``flap_ratio``): sort ascending, take the first index where the
    cumulative cost exceeds ``prune_share`` of the total; units scoring ``<=`` that value are pruned.
    ``flap`` (FLAP's ``prune_flap``, structure AL-AM): sort descending, take the index whose
    cumulative cost is closest to ``1 - prune_share`` of the total; units scoring ``>`` that value
    are kept.

    Either way a unit is pruned exactly when ``value <= threshold``.
    """
    if values.numel() == 0:
        raise ValueError("the global selection needs at least one unit")
    if prune_share <= 0:
        return -math.inf  # nothing to prune (both codes would still prune the lowest unit)
    costs = costs.to(torch.float64)
    total = costs.sum()
    if rule == "pp":
        order = torch.argsort(values, stable=True)
        cumulative = torch.cumsum(costs[order], dim=0)
        index = int(torch.searchsorted(cumulative, total * prune_share, right=True))
        index = min(index, values.numel() - 1)
        return float(values[order][index])
    if rule == "flap":
        order = torch.argsort(values, descending=True, stable=True)
        cumulative = torch.cumsum(costs[order], dim=0)
        index = int(torch.argmin((cumulative - total * (1.0 - prune_share)).abs()))
        return float(values[order][index])
    raise ValueError(f"unknown threshold rule {rule!r}; expected 'pp' or 'flap'")


def adaptive_ratios(
    plan: AllocationContext,
    scores: dict[BlockKey, ChannelScores],
    cost: str = "flops",
    rule: str = "pp",
) -> dict[BlockKey, float]:
    """FLAP's adaptive structure: ``{(layer, kind): pruned units / units}`` for every pruned block.

    The pruned units' total ``cost`` (``flops``: :meth:`AllocationContext.unit_flops`; ``params``:
    :meth:`AllocationContext.unit_params`) is ``plan.layer_ratio`` of the pruned blocks' total, up
    to one unit (see :func:`global_threshold`). Every block keeps at least one unit.
    """
    blocks = plan.blocks
    missing = [key for key in blocks if key not in scores]
    if missing:
        raise ValueError(f"adaptive allocation needs the scores of every pruned block; missing {missing[:4]}")
    unit_cost = {
        kind: float(plan.unit_flops(kind) if cost == "flops" else plan.unit_params(kind))
        for kind in plan.targets
    }
    per_block = {
        key: standardised_unit_scores(scores[key], key[1], plan.geometries[key[1]].unit_width)
        for key in blocks
    }
    values = torch.cat([per_block[key] for key in blocks])
    costs = torch.cat(
        [torch.full((per_block[key].numel(),), unit_cost[key[1]], dtype=torch.float64) for key in blocks]
    )
    threshold = global_threshold(values, costs, plan.layer_ratio, rule)
    ratios: dict[BlockKey, float] = {}
    clamped = []
    for key in blocks:
        units = plan.geometries[key[1]].units
        pruned = int((per_block[key] <= threshold).sum())
        if pruned >= units:
            pruned = units - 1
            clamped.append(key)
        ratios[key] = pruned / units
    if clamped:
        logger.info(
            "adaptive allocation keeps one unit in %d block(s) it would have emptied: %s",
            len(clamped),
            clamped,
        )
    return ratios


class UniformAllocation:
    """Uniform: every pruned block at the per-layer ratio p' (target inflated for skipped layers)."""

    stage = "allocate"
    name = "uniform"
    needs_scores = False
    per_batch = False

    @hookimpl
    def allocate(
        self, plan: AllocationContext, scores: dict[BlockKey, ChannelScores] | None, target: float
    ) -> dict[BlockKey, float]:
        return dict.fromkeys(plan.blocks, plan.layer_ratio)


class AdaptiveParams(BaseModel):
    """How FLAP's global selection weighs units and places its threshold."""

    model_config = ConfigDict(extra="forbid")

    cost: Literal["flops", "params"] = Field(
        "flops",
        description="what a unit costs in the global budget: flops (the PP paper's code, at the "
        "calibration's sequence length) or params (FLAP's code: 4*head_dim/3 MLP channels per head)",
    )
    rule: Literal["pp", "flap"] = Field(
        "pp",
        description="threshold: pp = first unit past the budget, pruned inclusive (PP's code); "
        "flap = cumulative kept cost closest to the target, kept strictly above (FLAP's code)",
    )


class AdaptiveAllocation:
    """Adaptive (FLAP's AL-AM): standardised scores per block, one global selection over all blocks."""

    stage = "allocate"
    name = "adaptive"
    needs_scores = True
    per_batch = False
    Params = AdaptiveParams

    def __init__(self, params: AdaptiveParams | None = None) -> None:
        self.params = params or AdaptiveParams()

    @hookimpl
    def allocate(
        self, plan: AllocationContext, scores: dict[BlockKey, ChannelScores] | None, target: float
    ) -> dict[BlockKey, float]:
        if scores is None:
            raise ValueError(
                "allocate 'adaptive' needs every block's scores at attach; it works with static methods only "
                "(select_probe 'none' and a frozen or absent history)"
            )
        return adaptive_ratios(plan, scores, self.params.cost, self.params.rule)


class CalibrationAdaptiveAllocation(AdaptiveAllocation):
    """FLAP's adaptive structure for any method with a calibration history, dynamic ones included:
    decided once, when the pipeline attaches, from every block's scores on the calibration history
    alone (the method's own metric and fusion, no probe); each batch's probe then chooses *which*
    units within each block's budget."""

    name = "adaptive-calibration"
    from_history = True

