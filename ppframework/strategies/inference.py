"""``infer`` strategies: run the full batch on the kept units."""

from __future__ import annotations

import torch

from ppframework.adapters.base import BlockRunner
from ppframework.hookspecs import hookimpl
from ppframework.types import BlockContext, BlockInputs, BlockMask, BlockOutput


def squared_mean_per_position(
    z: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over real rows of ``z[b, t, c]^2`` per position (fp32), and which positions had any."""
    real = attention_mask.bool()
    counts = real.to(torch.float32).sum(dim=0)
    if bool(real.all()):
        return z.float().square().mean(dim=0), counts > 0
    sums = z.float().square().masked_fill(~real[:, :, None], 0.0).sum(dim=0)
    return sums / counts.clamp(min=1.0)[:, None], counts > 0


def _run(block: BlockRunner, inputs: BlockInputs, mask: BlockMask | None, full: bool) -> torch.Tensor:
    return block.pre_output(
        inputs.normed,
        attention_mask=inputs.attention_mask,
        attn_bias=inputs.attn_bias,
        rotary=inputs.rotary,
        kept_units=None if full or mask is None else mask.kept_units,
        kept_kv_heads=None if full or mask is None else mask.kept_kv_heads,
    )


def _with_bias(output: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    """Add the mask's compensation bias (FLAP) to the block output, if any."""
    return output if mask.output_bias is None else output + mask.output_bias


class SlicedInference:
    """Physically sliced weights (PP): gather kept rows/columns per batch, then run."""

    stage = "infer"
    name = "sliced"

    @hookimpl
    def infer(
        self, ctx: BlockContext, block: BlockRunner, inputs: BlockInputs, mask: BlockMask
    ) -> BlockOutput:
        z = _run(block, inputs, mask, full=False)
        channels = block.channels_of(mask.kept_units)
        out = BlockOutput(output=_with_bias(block.output(z, channels), mask), kept_channels=channels)
        if ctx.collect_stats:
            out.sq_mean, out.position_valid = squared_mean_per_position(z, inputs.attention_mask)
        return out


class MaskedInference:
    """Reference: dense computation with pruned channels zeroed (slow; for checking)."""

    stage = "infer"
    name = "masked"

    @hookimpl
    def infer(
        self, ctx: BlockContext, block: BlockRunner, inputs: BlockInputs, mask: BlockMask
    ) -> BlockOutput:
        z = _run(block, inputs, mask, full=True)
        channels = block.channels_of(mask.kept_units)
        keep = torch.zeros(z.shape[-1], dtype=z.dtype, device=z.device)
        keep[channels if channels is not None else slice(None)] = 1
        out = BlockOutput(output=_with_bias(block.output(z * keep), mask), kept_channels=channels)
        if ctx.collect_stats:
            kept = z if channels is None else z.index_select(-1, channels)
            out.sq_mean, out.position_valid = squared_mean_per_position(kept, inputs.attention_mask)
        return out
