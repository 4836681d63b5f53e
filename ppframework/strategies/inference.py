"""``infer`` strategies: run the full batch on the kept units."""

from __future__ import annotations

import torch

from ppframework.adapters.base import BlockRunner
from ppframework.hookspecs import hookimpl
from ppframework.types import BlockContext, BlockInputs, BlockMask, BlockOutput


def squared_sum_over_rows(z: torch.Tensor) -> torch.Tensor:
    """``sum_b z[b, t, c]^2`` (T, C) in fp32, in one pass over ``z`` without a (B, T, C) temporary.

    CUDA: one fused fp32 reduction (``vector_norm`` squared). CPU: a running ``addcmul_`` over the
    rows (a strided reduction over dim 0 is slow there and a squared copy costs a fresh allocation).
    """
    if z.device.type == "cuda":
        return torch.linalg.vector_norm(z, dim=0, dtype=torch.float32).square_()
    acc = z[0].float().square()
    for row in z[1:]:
        row = row if row.dtype == torch.float32 else row.float()
        acc.addcmul_(row, row)
    return acc


def squared_mean_per_position(
    z: torch.Tensor, attention_mask: torch.Tensor, has_padding: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over real rows of ``z[b, t, c]^2`` per position (fp32), and which positions had any.

    ``has_padding`` False (known once per batch) skips looking at the mask; None checks it.
    """
    if has_padding is False:
        position_valid = torch.ones(z.shape[1], dtype=torch.bool, device=z.device)
        return squared_sum_over_rows(z).div_(z.shape[0]), position_valid
    real = attention_mask.bool()
    counts = real.to(torch.float32).sum(dim=0)
    if bool(real.all()):
        return squared_sum_over_rows(z).div_(z.shape[0]), counts > 0
    sums = z.float().square().masked_fill(~real[:, :, None], 0.0).sum(dim=0)
    return sums / counts.clamp(min=1.0)[:, None], counts > 0


def _run(block: BlockRunner, inputs: BlockInputs, mask: BlockMask | None, full: bool) -> torch.Tensor:
    # Known once per batch: no padding means no mask to check (a host-device sync on CUDA).
    no_padding = inputs.has_padding is False
    reuse = inputs.probe_reuse
    extra = {"reuse": reuse} if reuse is not None and not full and mask is not None else {}
    return block.pre_output(
        inputs.normed,
        attention_mask=None if no_padding else inputs.attention_mask,
        attn_bias=inputs.attn_bias,
        rotary=inputs.rotary,
        kept_units=None if full or mask is None else mask.kept_units,
        kept_kv_heads=None if full or mask is None else mask.kept_kv_heads,
        **extra,
    )


def _statistics(
    block: BlockRunner, z: torch.Tensor, inputs: BlockInputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-batch statistics for the history, timed as ``statistics`` when profiling."""
    padded = inputs.has_padding
    profiler = block.profiler
    if profiler is None:
        return squared_mean_per_position(z, inputs.attention_mask, padded)
    with profiler.stage("statistics"):
        return squared_mean_per_position(z, inputs.attention_mask, padded)


def _with_bias(output: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    """Add the mask's compensation bias (FLAP) to the block output, if any."""
    return output if mask.output_bias is None else output + mask.output_bias


class SlicedInference:
    """Physically sliced weights (PP): gather kept rows/columns per batch, then run.

    ``uses_probe_reuse``: passes the pipeline's :class:`~ppframework.adapters.base.ProbeReuse` to
    the runner, which then copies the probe's exact per-token values instead of recomputing them.
    """

    stage = "infer"
    name = "sliced"
    uses_probe_reuse = True

    @hookimpl
    def infer(
        self, ctx: BlockContext, block: BlockRunner, inputs: BlockInputs, mask: BlockMask
    ) -> BlockOutput:
        z = _run(block, inputs, mask, full=False)
        channels = block.channels_of(mask.kept_units)
        out = BlockOutput(output=_with_bias(block.output(z, channels), mask), kept_channels=channels)
        if ctx.collect_stats:
            out.sq_mean, out.position_valid = _statistics(block, z, inputs)
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
            out.sq_mean, out.position_valid = _statistics(block, kept, inputs)
        return out
