"""OPT decoder layers: multi-head attention with biases, ReLU MLP ``fc2(act(fc1(x)))``."""

from __future__ import annotations

import torch
from torch import nn

from ppframework.adapters.base import BlockRunner, ModelAdapter, ProbeReuse, attend
from ppframework.types import BlockGeometry, BlockKind


class OPTAttentionRunner(BlockRunner):
    """OPT attention (q, k, v pruned together by head) on kept heads.

    With a :class:`~ppframework.adapters.kv_cache.KVSlot` the cache holds the kept heads' keys and
    values, or every head's when the slot asks for ``full_kv`` (dense decode steps follow)."""

    def __init__(self, attn: nn.Module, geometry: BlockGeometry, layer_idx: int = 0) -> None:
        self.attn = attn
        self.geometry = geometry
        self.layer_idx = int(getattr(attn, "layer_idx", layer_idx))
        self.scaling = float(getattr(attn, "scaling", geometry.unit_width**-0.5))

    @property
    def out_proj(self) -> nn.Linear:
        return self.attn.out_proj

    def pre_output(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        attn_bias: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kept_units: torch.Tensor | None = None,
        kept_kv_heads: torch.Tensor | None = None,
        reuse: ProbeReuse | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        d = self.geometry.unit_width
        rows = self.channels_of(kept_units)
        q = (
            (self.linear(x, self.attn.q_proj, rows=rows, role="attn.q") * self.scaling)
            .view(batch, seq, -1, d)
            .transpose(1, 2)
        )
        slot = self.kv_slot
        kv_rows = None if slot is not None and slot.full_kv else rows
        k = self.linear(x, self.attn.k_proj, rows=kv_rows, role="attn.k")
        v = self.linear(x, self.attn.v_proj, rows=kv_rows, role="attn.v")
        k = k.view(batch, seq, -1, d).transpose(1, 2)
        v = v.view(batch, seq, -1, d).transpose(1, 2)
        if slot is not None:
            k, v = slot.store(k, v)
            if kv_rows is None and kept_units is not None:
                k, v = k.index_select(1, kept_units), v.index_select(1, kept_units)
        out = attend(q, k, v, attention_mask, attn_bias, 1.0, slot)
        return out.transpose(1, 2).reshape(batch, seq, -1)


class OPTMLPRunner(BlockRunner):
    """OPT feed-forward ``fc2(act(fc1(x)))`` on kept channels."""

    def __init__(self, layer: nn.Module, geometry: BlockGeometry) -> None:
        self.layer = layer
        self.geometry = geometry

    @property
    def out_proj(self) -> nn.Linear:
        return self.layer.fc2

    def pre_output(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        attn_bias: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kept_units: torch.Tensor | None = None,
        kept_kv_heads: torch.Tensor | None = None,
        reuse: ProbeReuse | None = None,
    ) -> torch.Tensor:
        return self.layer.activation_fn(self.linear(x, self.layer.fc1, rows=kept_units, role="mlp.fc1"))


class OPTAdapter(ModelAdapter):
    """OPT (pre- or post-LayerNorm, per ``do_layer_norm_before``)."""

    family = "opt"
    model_types = ("opt",)
    mlp_matrices = 2

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    def geometry(self, kind: BlockKind) -> BlockGeometry:
        cfg = self.config
        if kind is BlockKind.ATTENTION:
            heads = int(cfg.num_attention_heads)
            return BlockGeometry(kind, units=heads, unit_width=cfg.hidden_size // heads, num_kv_heads=heads)
        return BlockGeometry(kind, units=int(cfg.ffn_dim), unit_width=1)

    def runner(self, layer_index: int, kind: BlockKind) -> BlockRunner:
        layer = self.layers[layer_index]
        if kind is BlockKind.ATTENTION:
            return OPTAttentionRunner(layer.self_attn, self.geometry(kind), layer_index)
        return OPTMLPRunner(layer, self.geometry(kind))

    def default_positions(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """OPT counts positions over real tokens (its learned embeddings skip padding)."""
        mask = attention_mask.long()
        return mask.cumsum(dim=1) * mask - 1

    def _norm(self, layer: nn.Module, kind: BlockKind) -> nn.Module:
        return layer.self_attn_layer_norm if kind is BlockKind.ATTENTION else layer.final_layer_norm

    def block_input(self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.do_layer_norm_before:
            return self._norm(layer, kind)(hidden)
        return hidden

    def block_residual(
        self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor, block_out: torch.Tensor
    ) -> torch.Tensor:
        out = hidden + block_out
        if not self.config.do_layer_norm_before:
            out = self._norm(layer, kind)(out)
        return out
