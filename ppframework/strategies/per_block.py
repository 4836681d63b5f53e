"""One ``score_channels`` strategy per block kind: a metric for attention heads, another for MLP channels.

The per-block diagnostic (``benchmarks/block_choice.py``) found that no single metric chooses best in
both blocks: on Gemma 3 270M Wanda's metric with the post-norm gains folded in picks the attention
head to prune almost optimally where PPsp does not, while PPsp with the gains folded in picks the best
MLP channels. ``per-block`` lets a method use each where it works. Each child is any registered
``score_channels`` strategy (built-in or a plugin's), built through the registry with its own
parameters, and answers for the blocks of its kind unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ppframework.config.method_parts import StageConfig
from ppframework.config.presets import PER_BLOCK_DEFAULTS
from ppframework.hookspecs import hookimpl
from ppframework.strategies.scoring import PPspScore
from ppframework.strategies.wanda import WandaScore
from ppframework.types import BlockContext, BlockKind, ChannelScores, Probe

#: Builds one child strategy: (stage, its config, the config path for error messages) -> instance.
ChildBuilder = Callable[[str, StageConfig, str], Any]


class PerBlockParams(BaseModel):
    """The strategy for each block kind (defaults: the combination the per-block diagnostic points to)."""

    model_config = ConfigDict(extra="forbid")

    attention: StageConfig = Field(
        default_factory=lambda: StageConfig.model_validate(PER_BLOCK_DEFAULTS["attention"]),
        description="score_channels strategy for attention blocks (name and params)",
    )
    mlp: StageConfig = Field(
        default_factory=lambda: StageConfig.model_validate(PER_BLOCK_DEFAULTS["mlp"]),
        description="score_channels strategy for MLP blocks (name and params)",
    )


class PerBlockScore:
    """Scores attention heads with one score_channels strategy and MLP channels with another."""

    stage = "score_channels"
    name = "per-block"
    Params = PerBlockParams

    def __init__(
        self, params: PerBlockParams | None = None, children: dict[BlockKind, Any] | None = None
    ) -> None:
        self.params = params or PerBlockParams()
        self.children = children if children is not None else _builtin_children(self.params)
        #: The extra calibration passes the children need (e.g. ``taylor``'s gradient pass).
        self.calibration_statistics = tuple(
            dict.fromkeys(
                name
                for child in self.children.values()
                for name in getattr(child, "calibration_statistics", ())
            )
        )

    @classmethod
    def build_with(cls, params: PerBlockParams, build_child: ChildBuilder, field_path: str) -> PerBlockScore:
        """Build the children through the registry (any registered strategy, plugins included)."""
        children = {
            BlockKind.ATTENTION: build_child("score_channels", params.attention, f"{field_path}.attention"),
            BlockKind.MLP: build_child("score_channels", params.mlp, f"{field_path}.mlp"),
        }
        return cls(params, children)

    @hookimpl
    def score_channels(
        self, ctx: BlockContext, probe: Probe | None, probe_states: torch.Tensor | None, weight: torch.Tensor
    ) -> ChannelScores:
        return self.children[BlockKind(ctx.kind)].score_channels(
            ctx=ctx, probe=probe, probe_states=probe_states, weight=weight
        )


def _builtin_children(params: PerBlockParams) -> dict[BlockKind, Any]:
    """The children when built without the registry (direct construction): built-in scorers only."""
    known: dict[str, Any] = {"ppsp": PPspScore, "wanda": WandaScore}
    children = {}
    for kind, spec in ((BlockKind.ATTENTION, params.attention), (BlockKind.MLP, params.mlp)):
        cls = known.get(spec.name)
        if cls is None:
            raise ValueError(
                f"params.{kind.value}: {spec.name!r} can only be built through the strategy registry "
                f"(a method config); built directly, per-block knows {sorted(known)}"
            )
        children[kind] = cls(cls.Params.model_validate(spec.params))
    return children
