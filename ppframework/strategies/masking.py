"""``apply_mask`` strategies: turn channel scores into kept heads and channels."""

from __future__ import annotations

import math

import torch

from ppframework.adapters.base import unit_channels
from ppframework.hookspecs import hookimpl
from ppframework.types import BlockContext, BlockKind, BlockMask, ChannelScores


def pruned_count(total: int, ratio: float) -> int:
    """``floor(ratio * total)``, robust to float error (0.3 * 10 is 3, not 2)."""
    return min(total, math.floor(ratio * total + 1e-9))


def rounded_keep(total: int, ratio: float, round_to: int) -> int:
    """Kept MLP width: ``total - floor(ratio * total)`` rounded up to a multiple of ``round_to``."""
    keep = total - pruned_count(total, ratio)
    if round_to > 1:
        keep = math.ceil(keep / round_to) * round_to
    return min(total, keep)


FP16_MAX = 65504.0
"""The largest finite fp16 value: the PP code clamps its head sums there (``sum-fp16``)."""


def head_scores(channel_scores: torch.Tensor, head_dim: int, reduce: str) -> torch.Tensor:
    """Aggregate (H * d,) channel scores into (H,) head scores: ``l2`` (PPsp), ``sum``, or
    ``sum-fp16`` (the sum clamped at the fp16 maximum, as the PP code's ``sort_attn_metric``)."""
    per_head = channel_scores.view(-1, head_dim)
    if reduce == "l2":
        return per_head.norm(dim=1)
    if reduce == "sum":
        return per_head.sum(dim=1)
    if reduce == "sum-fp16":
        return per_head.sum(dim=1).clamp(max=FP16_MAX)
    raise ValueError(f"unknown head reduction {reduce!r}; expected 'l2', 'sum' or 'sum-fp16'")


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, sorted ascending."""
    return torch.topk(scores, keep, sorted=False).indices.sort().values


def compensation_bias(
    weight: torch.Tensor, channel_mean: torch.Tensor, kept_channels: torch.Tensor
) -> torch.Tensor:
    """FLAP's bias compensation ``W[:, pruned] @ mean[pruned]`` (hidden,), in the weight's dtype."""
    pruned_mean = channel_mean.float().clone()
    pruned_mean[kept_channels] = 0.0
    return (weight.float() @ pruned_mean.to(weight.device)).to(weight.dtype)


def structured_mask(ctx: BlockContext, scores: ChannelScores, ratio: float) -> BlockMask:
    """Drop the lowest-scoring floor(p' * H) heads or floor(p' * D_ff) channels (width rounded);
    attach FLAP's compensation bias when the scores carry a channel mean."""
    mask = _structured_units(ctx, scores, ratio)
    if scores.channel_mean is not None:
        if scores.out_weight is None:
            raise ValueError("bias compensation needs ChannelScores.out_weight (set by the scoring stage)")
        kept = unit_channels(mask.kept_units, ctx.geometry.unit_width)
        mask.output_bias = compensation_bias(scores.out_weight, scores.channel_mean, kept)
    return mask


def _structured_units(ctx: BlockContext, scores: ChannelScores, ratio: float) -> BlockMask:
    geo = ctx.geometry
    channel = scores.channel_scores()
    if ctx.kind is BlockKind.MLP:
        keep = rounded_keep(geo.units, ratio, ctx.round_to)
        return BlockMask(kept_units=keep_top(channel, keep), total_units=geo.units, unit_scores=channel)
    heads = head_scores(channel, geo.unit_width, scores.head_reduce)
    grouped = geo.group_size > 1
    if grouped and ctx.gqa_policy == "group":
        group = heads.view(geo.num_kv_heads, geo.group_size)
        group_scores = group.norm(dim=1) if scores.head_reduce == "l2" else group.sum(dim=1)
        kept_groups = keep_top(group_scores, geo.num_kv_heads - pruned_count(geo.num_kv_heads, ratio))
        offsets = torch.arange(geo.group_size, device=kept_groups.device)
        kept = (kept_groups[:, None] * geo.group_size + offsets[None, :]).reshape(-1)
        return BlockMask(kept_units=kept, total_units=geo.units, kept_kv_heads=kept_groups, unit_scores=heads)
    kept = keep_top(heads, geo.units - pruned_count(geo.units, ratio))
    kv = None if grouped else kept
    return BlockMask(kept_units=kept, total_units=geo.units, kept_kv_heads=kv, unit_scores=heads)


class StructuredMask:
    """Structured selection (PP): floored head counts, rounded MLP width, GQA policy from config."""

    stage = "apply_mask"
    name = "structured"

    @hookimpl
    def apply_mask(self, ctx: BlockContext, scores: ChannelScores, ratio: float) -> BlockMask:
        return structured_mask(ctx, scores, ratio)
