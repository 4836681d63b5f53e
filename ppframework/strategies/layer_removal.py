"""``allocate`` strategy ``block-influence``: ShortGPT's whole-layer removal (static).

The method removes the ``n = floor(ratio * L)`` decoder layers with the lowest block influence
(:mod:`ppframework.calibration.influence`) among the layers it may prune. Every layer holds the same
prunable weights, so ``n / L`` is the share of prunable weights removed: the same axis as the other
methods' ratio. The pipeline sees ``removes_layers`` and, instead of per-block masks, makes each
removed layer's forward return its input (no key/value cache entry is written for it); the other
layers run their own forward untouched (:mod:`ppframework.pipeline.removal`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ppframework.hookspecs import hookimpl
from ppframework.strategies.masking import pruned_count
from ppframework.types import AllocationContext, BlockKey, ChannelScores


def lowest_influence_layers(
    influence: torch.Tensor, ratio: float, num_layers: int, candidates: Sequence[int]
) -> list[int]:
    """The ``floor(ratio * num_layers)`` layers of ``candidates`` with the lowest ``influence``
    (ties: the lower index first), sorted ascending."""
    count = pruned_count(num_layers, ratio)
    if count > len(candidates):
        raise ValueError(
            f"ratio {ratio} removes {count} of {num_layers} layers but only {len(candidates)} may be "
            "removed (pruning.skip_layers); lower the ratio or skip fewer layers"
        )
    ranked = sorted(candidates, key=lambda layer: (float(influence[layer]), layer))
    return sorted(ranked[:count])


class BlockInfluenceRemoval:
    """ShortGPT: remove the whole layers with the lowest block influence (``1 - cos(in, out)``)."""

    stage = "allocate"
    name = "block-influence"
    #: the pipeline removes whole layers (see :mod:`ppframework.pipeline.removal`)
    removes_layers = True
    calibration_statistics = ("block-influence",)

    def layers_to_remove(
        self, influence: torch.Tensor, ratio: float, num_layers: int, candidates: Sequence[int]
    ) -> list[int]:
        """The layers this strategy removes at ``ratio``."""
        return lowest_influence_layers(influence, ratio, num_layers, candidates)

    @hookimpl
    def allocate(
        self, plan: AllocationContext, scores: dict[BlockKey, ChannelScores] | None, target: float
    ) -> dict[BlockKey, float]:
        """Asked as an ordinary ``allocate`` (outside a pipeline, which removes layers instead), it
        answers no pruning inside any block: the layers it removes are not expressible as block ratios."""
        return {block: 0.0 for block in plan.blocks}
