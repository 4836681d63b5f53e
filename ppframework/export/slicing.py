"""A static decision as a smaller model's weights: the kept rows and columns of every projection.

:func:`kept_units` reads what every block keeps (all units where a layer is skipped or a block is not
a target), :func:`plan_layout` turns it into per-layer widths and key/value slots, and
:func:`sliced_state` cuts the model's state dict to them, adding FLAP's compensation to the output
projections' biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ppframework.adapters.base import ModelAdapter
from ppframework.export.build import layers_prefix
from ppframework.export.families import ExportFamily
from ppframework.export.layout import LayerWidths, PrunedLayout, group_counts, kv_share, kv_slots
from ppframework.types import BlockKey, BlockKind, BlockMask

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KeptUnits:
    """Per layer: the kept query heads, the kept MLP channels and the compensation biases (if any)."""

    heads: tuple[torch.Tensor, ...]
    channels: tuple[torch.Tensor, ...]
    attention_bias: dict[int, torch.Tensor]
    mlp_bias: dict[int, torch.Tensor]


def kept_units(adapter: ModelAdapter, masks: dict[BlockKey, BlockMask]) -> KeptUnits:
    """What each layer keeps under ``masks`` (a block without a mask keeps everything)."""
    heads, channels = [], []
    biases: dict[BlockKind, dict[int, torch.Tensor]] = {BlockKind.ATTENTION: {}, BlockKind.MLP: {}}
    for index in range(adapter.num_layers):
        for kind, out in ((BlockKind.ATTENTION, heads), (BlockKind.MLP, channels)):
            mask = masks.get((index, kind))
            if mask is None:
                out.append(torch.arange(adapter.geometry(kind).units))
                continue
            out.append(mask.kept_units.detach().to("cpu", torch.long))
            if mask.output_bias is not None:
                biases[kind][index] = mask.output_bias.detach()
    return KeptUnits(tuple(heads), tuple(channels), biases[BlockKind.ATTENTION], biases[BlockKind.MLP])


def plan_layout(
    adapter: ModelAdapter, kept: KeptUnits, family: ExportFamily, shared_kv: bool
) -> tuple[PrunedLayout, list[list[int]]]:
    """Per-layer widths and each layer's key/value slots (:func:`~ppframework.export.layout.kv_slots`).

    ``shared_kv``: one slot share for every layer (the gcd over layers), so that layers keeping as many
    query heads also get as many key/value heads (a standard config has one count for all layers).
    """
    geo = adapter.geometry(BlockKind.ATTENTION)
    group = geo.group_size
    shares = [kv_share(group_counts(h, group)) for h in kept.heads]
    if shared_kv:
        shares = [math.gcd(*shares)] * len(shares)
    slots = [kv_slots(h, group, s) for h, s in zip(kept.heads, shares, strict=True)]
    layers = tuple(
        LayerWidths(
            num_attention_heads=int(h.numel()),
            num_key_value_heads=len(slot),
            intermediate_size=int(c.numel()),
            attention_output_bias=i in kept.attention_bias,
            mlp_output_bias=i in kept.mlp_bias,
        )
        for i, (h, c, slot) in enumerate(zip(kept.heads, kept.channels, slots, strict=True))
    )
    return PrunedLayout(family.name, geo.unit_width, layers), slots


def _channels(units: torch.Tensor, width: int) -> torch.Tensor:
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


def _cut(state: State, name: str, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    weight = state[f"{name}.weight"]
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    state[f"{name}.weight"] = weight.contiguous()
    bias = state.get(f"{name}.bias")
    if bias is not None and rows is not None:
        state[f"{name}.bias"] = bias.index_select(0, rows.to(bias.device)).contiguous()


def _add_bias(state: State, name: str, extra: torch.Tensor) -> None:
    weight = state[f"{name}.weight"]
    bias = state.get(f"{name}.bias")
    base = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias
    state[f"{name}.bias"] = (base.float() + extra.to(base.device).float()).to(weight.dtype)


def sliced_state(
    model: nn.Module, adapter: ModelAdapter, kept: KeptUnits, slots: list[list[int]], family: ExportFamily
) -> State:
    """``model``'s state dict with every layer cut to ``kept`` (and its key/value ``slots``)."""
    state = dict(model.state_dict())
    prefix = layers_prefix(model)
    geo = adapter.geometry(BlockKind.ATTENTION)
    width = adapter.geometry(BlockKind.MLP).units
    n_q, n_kv = geo.units * geo.unit_width, geo.num_kv_heads * geo.unit_width
    for index in range(adapter.num_layers):
        layer = f"{prefix}.{index}"
        q_rows = _channels(kept.heads[index], geo.unit_width)
        kv_rows = _channels(torch.tensor(slots[index], dtype=torch.long), geo.unit_width)
        cuts = {
            **family.attention_slices(q_rows, kv_rows, n_q, n_kv),
            **family.mlp_slices(kept.channels[index], width),
        }
        for name, (rows, cols) in cuts.items():
            _cut(state, f"{layer}.{name}", rows, cols)
        if index in kept.attention_bias:
            _add_bias(state, f"{layer}.{family.output_projection(True)}", kept.attention_bias[index])
        if index in kept.mlp_bias:
            _add_bias(state, f"{layer}.{family.output_projection(False)}", kept.mlp_bias[index])
    return state
