"""The ``apply_mask`` check: which units a mask keeps, and its key/value heads and bias."""

from __future__ import annotations

from typing import Any

import torch

from ppframework.testing.conformance.examples import _run_stage, _strategies
from ppframework.testing.conformance.fixtures import make_context
from ppframework.testing.conformance.inputs import (
    _SEED,
    _activation_times_weight,
    _draw_geometry,
    _nonnegative,
)
from ppframework.testing.conformance.subject import _Subject
from ppframework.testing.conformance.values import _cloned, _fields, _fmt, _same, _snapshot
from ppframework.types import BlockContext, BlockGeometry, BlockKind, BlockMask, ChannelScores
from ppframework.validation import check_mask


def _check_mask(
    subject: _Subject, ctx: BlockContext, mask: Any, ratio: float, hidden: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    geo = ctx.geometry
    subject.require(isinstance(mask, BlockMask), "returns a BlockMask", lambda: f"got {type(mask).__name__}")
    kept = subject.require_index(mask.kept_units, geo.units, "kept_units")
    subject.require(
        mask.total_units == geo.units,
        "total_units == geometry.units",
        lambda: f"total_units={mask.total_units!r}, units={geo.units}",
    )
    subject.require(
        1 <= kept.numel() <= geo.units,
        "keeps at least one unit",
        lambda: f"kept {kept.numel()} of {geo.units} at ratio {ratio}",
    )
    if ratio == 0:
        subject.require(
            kept.numel() == geo.units,
            "ratio 0 keeps every unit",
            lambda: f"kept {_fmt(kept)} of {geo.units}",
        )
    if ctx.kind is BlockKind.MLP:
        subject.require(
            kept.numel() == geo.units or kept.numel() % ctx.round_to == 0,
            "kept MLP width is a multiple of ctx.round_to (or everything)",
            lambda: f"kept {kept.numel()} of {geo.units} with round_to={ctx.round_to}",
        )
        subject.require(
            mask.kept_kv_heads is None,
            "kept_kv_heads is None for MLP blocks",
            lambda: _fmt(mask.kept_kv_heads),
        )
    kv: torch.Tensor | None = None
    if ctx.kind is BlockKind.ATTENTION:
        n_kv = geo.num_kv_heads or geo.units
        if mask.kept_kv_heads is not None:
            kv = subject.require_index(mask.kept_kv_heads, n_kv, "kept_kv_heads")
            groups = torch.div(kept, geo.group_size, rounding_mode="floor")
            subject.require(
                bool(torch.isin(groups, kv).all()),
                "every kept query head's key/value head is kept",
                lambda: f"kept_units={_fmt(kept)}, kept_kv_heads={_fmt(kv)}, group_size={geo.group_size}",
            )
        if ratio == 0 and kv is not None:
            subject.require(
                kv.numel() == n_kv, "ratio 0 keeps every unit", lambda: f"kept_kv_heads={_fmt(kv)}"
            )
        if ctx.gqa_policy == "group" and geo.group_size > 1:
            groups = torch.div(kept, geo.group_size, rounding_mode="floor").unique()
            whole = (groups[:, None] * geo.group_size + torch.arange(geo.group_size)[None, :]).reshape(-1)
            subject.require(
                _same(whole, kept),
                "gqa_policy 'group' keeps whole key/value groups",
                lambda: f"kept_units={_fmt(kept)} with group_size={geo.group_size}",
            )
            if kv is not None:
                subject.require(
                    _same(groups, kv),
                    "gqa_policy 'group': kept_kv_heads are the kept groups",
                    lambda: f"kept_units={_fmt(kept)}, kept_kv_heads={_fmt(kv)}",
                )
    if mask.unit_scores is not None:
        subject.require_shape(
            mask.unit_scores, (geo.units,), "unit_scores is None or (units,)", "unit_scores"
        )
    if mask.output_bias is not None:
        bias = subject.require_shape(
            mask.output_bias, (hidden,), "output_bias is None or (hidden,)", "output_bias"
        )
        subject.require_finite(bias, "output_bias is finite", "output_bias")
    return kept, kv


def _draw_mask_case(data: Any) -> dict[str, Any]:
    st = _strategies()
    return {
        "geometry": _draw_geometry(data),
        "ratio": data.draw(
            st.one_of(st.just(0.0), st.floats(0.0, 0.9), st.sampled_from((0.25, 0.5, 0.9))), label="ratio"
        ),
        "round_to": data.draw(st.sampled_from((1, 2, 4, 8)), label="round_to"),
        "gqa_policy": data.draw(st.sampled_from(("query-only", "group")), label="gqa_policy"),
        "head_reduce": data.draw(st.sampled_from(("l2", "sum")), label="head_reduce"),
        "values": data.draw(st.sampled_from(("random", "ties", "zeros")), label="values"),
        "compensation": data.draw(st.booleans(), label="bias_compensation"),
        "hidden": data.draw(st.integers(1, 8), label="hidden"),
        "seq": data.draw(st.integers(1, 8), label="seq_len"),
        "seed": data.draw(st.integers(0, _SEED), label="seed"),
    }


_MASK_GEOMETRIES: tuple[BlockGeometry, ...] = (
    BlockGeometry(BlockKind.ATTENTION, units=4, unit_width=4, num_kv_heads=4),  # multi-head
    BlockGeometry(BlockKind.ATTENTION, units=8, unit_width=2, num_kv_heads=2),  # grouped-query
    BlockGeometry(BlockKind.ATTENTION, units=3, unit_width=2, num_kv_heads=1),  # multi-query
    BlockGeometry(BlockKind.MLP, units=20, unit_width=1),
    BlockGeometry(BlockKind.MLP, units=1, unit_width=1),
)

_MASK_CORNERS: tuple[dict[str, Any], ...] = tuple(
    {
        "geometry": geometry,
        "ratio": ratio,
        "round_to": 8 if geometry.kind is BlockKind.MLP and policy == "group" else 1,
        "gqa_policy": policy,
        "head_reduce": "l2" if ratio < 0.5 else "sum",
        "values": "ties" if ratio == 0.5 else "random",
        "compensation": ratio == 0.9,
        "hidden": 6,
        "seq": 5,
        "seed": 0,
    }
    for geometry in _MASK_GEOMETRIES
    for ratio in (0.0, 0.3, 0.5, 0.9)
    for policy in ("query-only", "group")
)


def _mask_case(
    subject: _Subject,
    *,
    geometry: BlockGeometry,
    ratio: float,
    round_to: int,
    gqa_policy: str,
    head_reduce: str,
    values: str,
    compensation: bool,
    hidden: int,
    seq: int,
    seed: int,
) -> None:
    channels = geometry.channels
    gen = torch.Generator().manual_seed(seed)
    scores = ChannelScores(
        weight_term=_nonnegative(gen, (channels,), values),
        combine=_activation_times_weight,
        head_reduce=head_reduce,
        activation=_nonnegative(gen, (channels,), values),
        metric="conformance",
        bias_compensation=compensation,
        channel_mean=torch.randn(channels, generator=gen) if compensation else None,
        out_weight=torch.randn(hidden, channels, generator=gen),
    )
    before = _snapshot(_fields(scores, "scores"))

    def ctx() -> BlockContext:
        return make_context(
            geometry.kind, geometry, seq_len=seq, seed=seed, round_to=round_to, gqa_policy=gqa_policy
        )

    context = ctx()
    mask = subject.call(ctx=context, scores=scores, ratio=ratio)
    subject.require_unchanged(before, _fields(scores, "scores"), "the scores are not modified")
    kept, _ = _check_mask(subject, context, mask, ratio, hidden)
    subject.require_accepted(check_mask, mask, context, hidden)
    again = subject.call(ctx=ctx(), scores=_cloned(scores), ratio=ratio)
    subject.require_repeated(
        again,
        mask,
        BlockMask,
        ("kept_units", "kept_kv_heads", "output_bias"),
        "deterministic: same inputs and seed give the same mask",
        lambda: f"kept_units {_fmt(kept)}, then {_fmt(getattr(again, 'kept_units', None))}",
    )


def check_apply_mask(strategy: Any, *, max_examples: int = 20) -> None:
    """Check an ``apply_mask`` strategy against the hook contract.

    Inputs: attention geometries (1-8 heads; multi-head, grouped-query and multi-query) and MLP
    geometries, non-negative channel scores (continuous, tied or zero) with activation set, head
    reduction l2/sum, optional bias compensation, ratio in [0, 0.9], both GQA policies and several
    ``round_to``. Asserts: a BlockMask with ``kept_units`` 1-D long sorted unique in range,
    ``total_units == units``, 1 <= kept <= units, ratio 0 keeps everything, kept MLP width a
    multiple of ``round_to`` (or everything); ``kept_kv_heads`` None for MLP, else None or sorted
    unique in range and covering every kept head's group; under ``gqa_policy='group'`` whole
    groups; ``unit_scores`` None or (units,); ``output_bias`` None or (hidden,) finite; the scores
    are not modified; the same inputs and seed give the same mask.
    """
    _run_stage(strategy, "apply_mask", _mask_case, _draw_mask_case, max_examples, _MASK_CORNERS)
