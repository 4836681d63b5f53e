"""The five per-block stage hooks as the pipeline calls them: a typed facade over its plugin manager,
and the stage timer used when no profiler is set."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pluggy
import torch

from ppframework.adapters.base import BlockRunner
from ppframework.types import (
    AllocationContext,
    BlockContext,
    BlockInputs,
    BlockKey,
    BlockMask,
    ChannelScores,
    Probe,
)

#: A context manager that does nothing (a stage untimed, a layer without offloaded weights).
NO_STAGE = nullcontext()


def no_stage(name: str) -> AbstractContextManager[None]:
    """The stage timer used when no profiler is set: does nothing."""
    return NO_STAGE


class StageHooks:
    """Typed facade over a pipeline's plugin manager: one method per stage hook."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._hook = pm.hook

    def allocate(
        self, plan: AllocationContext, scores: dict[BlockKey, ChannelScores] | None, target: float
    ) -> dict[BlockKey, float]:
        """Every pruned block's ratio (the ``allocate`` hook)."""
        return self._hook.allocate(plan=plan, scores=scores, target=target)

    def select_probe(
        self, ctx: BlockContext, residual: torch.Tensor, normed: torch.Tensor, attention_mask: torch.Tensor
    ) -> Probe | None:
        """The rows and tokens a block's probe runs on (the ``select_probe`` hook)."""
        return self._hook.select_probe(
            ctx=ctx, residual=residual, normed=normed, attention_mask=attention_mask
        )

    def score_channels(
        self, ctx: BlockContext, probe: Probe | None, probe_states: torch.Tensor | None, weight: torch.Tensor
    ) -> Any:
        """A block's channel scores from its probe (the ``score_channels`` hook)."""
        return self._hook.score_channels(ctx=ctx, probe=probe, probe_states=probe_states, weight=weight)

    def fuse_history(self, ctx: BlockContext, scores: Any, history: Any) -> Any:
        """The scores fused with the block's history (the ``fuse_history`` hook)."""
        return self._hook.fuse_history(ctx=ctx, scores=scores, history=history)

    def apply_mask(self, ctx: BlockContext, scores: Any, ratio: float) -> BlockMask:
        """The units a block keeps (the ``apply_mask`` hook)."""
        return self._hook.apply_mask(ctx=ctx, scores=scores, ratio=ratio)

    def infer(self, ctx: BlockContext, block: BlockRunner, inputs: BlockInputs, mask: BlockMask) -> Any:
        """The block's pruned full pass (the ``infer`` hook)."""
        return self._hook.infer(ctx=ctx, block=block, inputs=inputs, mask=mask)
