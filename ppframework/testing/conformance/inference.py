"""The ``infer`` check: a pruned block's forward on one-layer tiny LLaMA and OPT models."""

from __future__ import annotations

import functools
from typing import Any

import torch

from ppframework.testing.conformance.examples import _run_stage, _strategies
from ppframework.testing.conformance.fixtures import make_context
from ppframework.testing.conformance.inputs import _SEED, PADDINGS, _padding_mask, _subset
from ppframework.testing.conformance.subject import _Subject
from ppframework.testing.conformance.values import _fields, _fmt, _max_diff, _same, _snapshot
from ppframework.types import BlockGeometry, BlockInputs, BlockKind, BlockMask, BlockOutput
from ppframework.validation import check_output

_TINY_FAMILIES = ("llama-gqa", "opt")
_ATOL = 1e-5
_RTOL = 1e-4


@functools.cache
def _tiny_block_model(family: str) -> tuple[Any, Any]:
    """A one-layer tiny model of ``family`` (hidden 32) and its adapter, built once."""
    from ppframework.adapters import get_adapter
    from ppframework.testing.tiny import tiny_model

    if family == "opt":
        overrides = {"hidden_size": 32, "word_embed_proj_dim": 32, "ffn_dim": 48, "num_hidden_layers": 1}
    else:
        overrides = {"hidden_size": 32, "head_dim": 8, "intermediate_size": 48, "num_hidden_layers": 1}
    model = tiny_model(family, seed=0, **overrides)
    return model, get_adapter(model)


def _rotary(model: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The model's rotary (cos, sin) of shape (B, T, d) at positions 0..T-1, or None."""
    rotary_emb = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary_emb is None:
        return None
    batch, seq = hidden.shape[:2]
    positions = torch.arange(seq)[None, :].expand(batch, seq)
    cos, sin = rotary_emb(hidden, positions)
    return cos, sin


def _random_block_mask(
    gen: torch.Generator, geometry: BlockGeometry, policy: str, hidden: int, with_bias: bool
) -> BlockMask:
    units = geometry.units
    kv: torch.Tensor | None = None
    if geometry.kind is BlockKind.ATTENTION and geometry.group_size > 1 and policy == "group":
        kv = _subset(gen, torch.arange(geometry.num_kv_heads))
        offsets = torch.arange(geometry.group_size)
        kept = (kv[:, None] * geometry.group_size + offsets[None, :]).reshape(-1)
    else:
        kept = _subset(gen, torch.arange(units))
        if geometry.kind is BlockKind.ATTENTION and geometry.group_size == 1 and policy == "group":
            kv = kept.clone()
    bias = 0.1 * torch.randn(hidden, generator=gen) if with_bias else None
    return BlockMask(kept_units=kept, total_units=units, kept_kv_heads=kv, output_bias=bias)


def _draw_infer_case(data: Any) -> dict[str, Any]:
    st = _strategies()
    return {
        "family": data.draw(st.sampled_from(_TINY_FAMILIES), label="family"),
        "kind": data.draw(st.sampled_from(tuple(BlockKind)), label="kind"),
        "batch": data.draw(st.integers(1, 3), label="batch"),
        "seq": data.draw(st.integers(1, 10), label="seq_len"),
        "padding": data.draw(st.sampled_from(PADDINGS), label="padding"),
        "keep_all": data.draw(st.booleans(), label="keep_all"),
        "policy": data.draw(st.sampled_from(("query-only", "group")), label="gqa_policy"),
        "with_bias": data.draw(st.booleans(), label="output_bias"),
        "collect": data.draw(st.booleans(), label="collect_stats"),
        "seed": data.draw(st.integers(0, _SEED), label="seed"),
    }


_INFER_CORNERS: tuple[dict[str, Any], ...] = tuple(
    {
        "family": family,
        "kind": kind,
        "batch": 3,
        "seq": 7,
        "padding": padding,
        "keep_all": keep_all,
        "policy": policy,
        "with_bias": with_bias,
        "collect": True,
        "seed": 0,
    }
    for family in _TINY_FAMILIES
    for kind in BlockKind
    for keep_all, padding, policy, with_bias in (
        (True, "right-short", "query-only", True),
        (True, "none", "query-only", False),
        (False, "left-short", "group", True),
        (False, "right", "query-only", False),
    )
)


def _infer_case(
    subject: _Subject,
    *,
    family: str,
    kind: BlockKind,
    batch: int,
    seq: int,
    padding: str,
    keep_all: bool,
    policy: str,
    with_bias: bool,
    collect: bool,
    seed: int,
) -> None:
    from ppframework.adapters.base import additive_attention_bias

    gen = torch.Generator().manual_seed(seed)
    model, adapter = _tiny_block_model(family)
    layer = adapter.layers[0]
    size = int(model.config.hidden_size)
    mask = _padding_mask(gen, batch, seq, padding)
    real = mask.bool()
    residual = torch.randn(batch, seq, size, generator=gen)
    attention = kind is BlockKind.ATTENTION
    with torch.no_grad():
        normed = adapter.block_input(layer, kind, residual)
        rotary = _rotary(model, residual) if attention else None
        attn_bias = additive_attention_bias(mask, normed.dtype) if attention else None
        reference = adapter.runner(0, kind)
        z_full = reference.pre_output(normed, attention_mask=mask, attn_bias=attn_bias, rotary=rotary)
        dense = reference.output(z_full)
    runner = adapter.runner(0, kind)
    geometry = runner.geometry
    if keep_all:
        bias = 0.1 * torch.randn(size, generator=gen) if with_bias else None
        block_mask = BlockMask(
            kept_units=torch.arange(geometry.units), total_units=geometry.units, output_bias=bias
        )
    else:
        block_mask = _random_block_mask(gen, geometry, policy, size, with_bias)
    inputs = BlockInputs(
        normed=normed, residual=residual, attention_mask=mask, attn_bias=attn_bias, rotary=rotary
    )

    def current() -> dict[str, Any]:
        weights = {f"weights.{name}": p for name, p in layer.named_parameters()}
        return {**_fields(inputs, "inputs"), **_fields(block_mask, "mask"), **weights}

    before = _snapshot(current())
    ctx = make_context(
        kind, geometry, seed=seed, position_valid=real.any(dim=0), collect_stats=collect, gqa_policy=policy
    )
    with torch.no_grad():
        out = subject.call(ctx=ctx, block=runner, inputs=inputs, mask=block_mask)
    subject.require_unchanged(before, current(), "the inputs, the mask and the weights are not modified")
    subject.require(
        isinstance(out, BlockOutput), "returns a BlockOutput", lambda: f"got {type(out).__name__}"
    )
    output = subject.require_shape(
        out.output, (batch, seq, size), "output has shape (B, T, hidden)", "output"
    )
    subject.require_finite(output, "output is finite", "output")
    if keep_all:
        expected = dense if block_mask.output_bias is None else dense + block_mask.output_bias
        subject.require(
            torch.allclose(output[real], expected[real], rtol=_RTOL, atol=_ATOL),
            "a keep-all mask reproduces the unpruned block (plus output_bias) on real tokens",
            lambda: f"max abs difference {_max_diff(output[real], expected[real]):.3g}",
        )
    subject.require_accepted(check_output, out, ctx, (batch, seq, size), block_mask)
    if not collect:
        return
    channels = runner.channels_of(block_mask.kept_units)
    sq_mean = subject.require_shape(
        out.sq_mean,
        (seq, int(channels.numel())),
        "with collect_stats sq_mean is (T, kept channels)",
        "sq_mean",
    )
    subject.require_finite(sq_mean, "sq_mean is finite and >= 0", "sq_mean", nonnegative=True)
    position_valid = subject.require_shape(
        out.position_valid, (seq,), "with collect_stats position_valid has shape (T,)", "position_valid"
    )
    subject.require(
        _same(position_valid.bool(), real.any(dim=0)),
        "position_valid is False exactly where every row is padding",
        lambda: f"position_valid={_fmt(position_valid)}, attention_mask={_fmt(mask)}",
    )
    kept_channels = out.kept_channels
    subject.require(
        (keep_all and kept_channels is None) or _same(kept_channels, channels),
        "kept_channels == block.channels_of(mask.kept_units) (or None with keep-all)",
        lambda: f"kept_channels={_fmt(kept_channels)}, expected {_fmt(channels)}",
    )
    if keep_all:
        valid = real.any(dim=0)
        squares = z_full.float().square() * real[:, :, None]
        expected_sq = squares.sum(dim=0) / real.sum(dim=0).clamp(min=1)[:, None]
        subject.require(
            torch.allclose(sq_mean.float()[valid], expected_sq[valid], rtol=_RTOL, atol=1e-6),
            "sq_mean is the mean over real rows of the squared output-projection input",
            lambda: f"max abs difference {_max_diff(sq_mean.float()[valid], expected_sq[valid]):.3g}",
        )


def check_infer(strategy: Any, *, max_examples: int = 20) -> None:
    """Check an ``infer`` strategy against the hook contract on a tiny random model.

    Inputs: the attention and MLP blocks of a one-layer tiny LLaMA (grouped-query attention,
    rotary) and a one-layer tiny OPT, hidden 32, batches with and without right/left padding,
    keep-all and random masks (query-only, whole-group and MHA key/value masks), with and
    without ``output_bias``. Asserts: a BlockOutput whose output is (B, T, hidden) and finite; with
    a keep-all mask it equals the unpruned block (plus ``output_bias``) on real tokens; with
    ``ctx.collect_stats`` ``sq_mean`` is (T, kept channels) finite >= 0 (the dense mean of the
    squared output-projection input over real rows at real positions with a keep-all mask),
    ``position_valid`` is (T,) and False exactly at all-padding positions, ``kept_channels`` equals
    ``block.channels_of(mask.kept_units)`` (or None with keep-all); the inputs, the mask and the
    model's weights are not modified.
    """
    _run_stage(strategy, "infer", _infer_case, _draw_infer_case, max_examples, _INFER_CORNERS)
