"""``fuse_history`` strategies: combine probe evidence with the per-position history."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ppframework.history import BlockHistory
from ppframework.hookspecs import hookimpl
from ppframework.types import BlockContext, ChannelScores


def importance_scaled_fusion(probe: torch.Tensor, history: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``F = (1 - rho) * Hist + rho * P`` with ``rho = P / (P + Hist + eps)``, per entry."""
    rho = probe / (probe + history + eps)
    return (1.0 - rho) * history + rho * probe


def sum_valid_positions(values: torch.Tensor, position_valid: torch.Tensor | None) -> torch.Tensor:
    """Sum rows of (n_pos, C) ``values`` over the valid positions."""
    if position_valid is None:
        return values.sum(dim=0)
    return (values * position_valid[:, None].to(values.dtype)).sum(dim=0)


def history_activation(ctx: BlockContext, history: BlockHistory) -> torch.Tensor:
    """``a_c`` from history alone: the sum over this batch's real positions of ``Hist[t, c]``."""
    rows = history.sq_mean[: ctx.seq_len]
    return sum_valid_positions(rows, ctx.position_valid)


class FusionParams(BaseModel):
    """Numerical guard of the importance-scaled fusion."""

    model_config = ConfigDict(extra="forbid")

    eps: float = Field(1e-6, gt=0.0)


class ImportanceScaledFusion:
    """Importance-scaled fusion (PP) per probed position; probe-only without history,
    history-only without probe."""

    stage = "fuse_history"
    name = "importance-scaled"
    Params = FusionParams

    def __init__(self, params: FusionParams | None = None) -> None:
        self.params = params or FusionParams()

    @hookimpl
    def fuse_history(
        self, ctx: BlockContext, scores: ChannelScores, history: BlockHistory | None
    ) -> ChannelScores:
        if scores.evidence is None:
            if history is not None:
                scores.activation = history_activation(ctx, history)
            return scores
        evidence = scores.evidence
        if history is not None:
            past = history.sq_mean.index_select(0, scores.positions)
            evidence = importance_scaled_fusion(evidence, past, self.params.eps)
        scores.activation = sum_valid_positions(evidence, scores.position_valid)
        return scores
