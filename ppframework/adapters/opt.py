"""OPT decoder layers: multi-head attention with biases, ReLU MLP ``fc2(act(fc1(x)))``.

What OPT does differently from the shared runners' defaults: its attention computes q, k and v with
one matmul each (roles ``attn.q``/``attn.k``/``attn.v``) and scales the queries right after their
projection (as its own attention does; the scores are then not scaled again); a key/value head goes
with its query head; its MLP is ungated and lives on the layer itself; positions are learned and
counted over real tokens; each block is pre- or post-LayerNorm (``do_layer_norm_before``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ppframework.adapters.attention_runner import QKV, AttentionRunner
from ppframework.adapters.base import BlockCall, BlockRunner
from ppframework.adapters.decoder import DecoderAdapter
from ppframework.adapters.kv_cache import KVSlot
from ppframework.types import BlockGeometry, BlockKind


class OPTAttentionRunner(AttentionRunner):
    """OPT attention (q, k, v pruned together by head) on kept heads.

    With a :class:`~ppframework.adapters.kv_cache.KVSlot` the cache holds the kept heads' keys and
    values, or every head's when the slot asks for ``full_kv`` (dense decode steps follow)."""

    reuses_probe = False  # the projections are recomputed on every token

    def __init__(
        self, attn: nn.Module, geometry: BlockGeometry, layer_idx: int = 0, config: Any = None
    ) -> None:
        super().__init__(attn, geometry, layer_idx, config)
        self.query_scale = self.scaling  # applied to the projected queries ...
        self.scaling = 1.0  # ... so the attention kernels do not scale the scores again

    @property
    def out_proj(self) -> nn.Linear:
        return self.attn.out_proj

    def project(self, x: torch.Tensor, call: BlockCall) -> QKV:
        attn = self.attn
        rows = self.channels_of(call.kept_units)
        q = self.linear(x, attn.q_proj, rows=rows, role="attn.q") * self.query_scale
        kv_rows, _ = self.kv_maps(call.kept_units, call.kept_kv_heads, x.device)
        k = self.linear(x, attn.k_proj, rows=kv_rows, role="attn.k")
        v = self.linear(x, attn.v_proj, rows=kv_rows, role="attn.v")
        return q, k, v

    def kv_maps(
        self, kept_units: torch.Tensor | None, kept_kv_heads: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor | None, None]:
        """The kept heads' k/v rows (every row when the cache takes every head); no index: after
        :meth:`store` the keys and values are those of the kept heads, in order."""
        slot = self.kv_slot
        return (None if slot is not None and slot.full_kv else self.channels_of(kept_units)), None

    def store(
        self, slot: KVSlot, k: torch.Tensor, v: torch.Tensor, kept_units: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = slot.store(k, v)
        if slot.full_kv and kept_units is not None:  # every head was cached: attend with the kept ones
            k, v = k.index_select(1, kept_units), v.index_select(1, kept_units)
        return k, v


class OPTMLPRunner(BlockRunner):
    """OPT feed-forward ``fc2(act(fc1(x)))`` on kept channels."""

    def __init__(self, layer: nn.Module, geometry: BlockGeometry) -> None:
        self.layer = layer
        self.geometry = geometry

    @property
    def out_proj(self) -> nn.Linear:
        return self.layer.fc2

    def run(self, x: torch.Tensor, call: BlockCall) -> torch.Tensor:
        return self.layer.activation_fn(self.linear(x, self.layer.fc1, rows=call.kept_units, role="mlp.fc1"))


class OPTAdapter(DecoderAdapter):
    """OPT (pre- or post-LayerNorm, per ``do_layer_norm_before``)."""

    family = "opt"
    model_types = ("opt",)
    mlp_matrices = 2
    attention_runner = OPTAttentionRunner
    mlp_runner = OPTMLPRunner
    mlp_width = "ffn_dim"
    pre_norms = ("self_attn_layer_norm", "final_layer_norm")

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        """The layer itself (OPT keeps ``fc1``/``fc2`` on the decoder layer)."""
        return layer

    def default_positions(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """OPT counts positions over real tokens (its learned embeddings skip padding)."""
        mask = attention_mask.long()
        return mask.cumsum(dim=1) * mask - 1

    def block_input(self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.do_layer_norm_before:
            return self.norm(layer, kind)(hidden)
        return hidden

    def block_residual(
        self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor, block_out: torch.Tensor
    ) -> torch.Tensor:
        out = hidden + block_out
        if not self.config.do_layer_norm_before:
            out = self.norm(layer, kind)(out)
        return out
