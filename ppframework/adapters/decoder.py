"""The shared adapter for decoder-only models: a family names its modules, this does the rest.

:class:`DecoderAdapter` finds the layers (``model.model.layers``), reads the block sizes from the
config, builds each block's runner (:attr:`DecoderAdapter.attention_runner` on ``layer.self_attn``,
:attr:`DecoderAdapter.mlp_runner` on :meth:`DecoderAdapter.mlp_module`) and forms the residual around
each block with the norms it names (:attr:`DecoderAdapter.pre_norms`, and
:attr:`DecoderAdapter.post_norms` for families that also norm the block output). A family adapter
sets ``family``, ``model_types`` and whatever differs from these defaults (see ``docs/families.md``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ppframework.adapters.attention_runner import AttentionRunner
from ppframework.adapters.base import BlockRunner, ModelAdapter
from ppframework.adapters.mlp_runner import MLPRunner
from ppframework.types import BlockGeometry, BlockKind


class DecoderAdapter(ModelAdapter):
    """Decoder layers with an attention block and an MLP block, each with its own residual."""

    #: The attention runner class, built as ``attention_runner(layer.self_attn, geometry, index, config)``.
    attention_runner: ClassVar[type[AttentionRunner]] = AttentionRunner
    #: The MLP runner class, built as ``mlp_runner(mlp_module(layer), geometry)``.
    mlp_runner: ClassVar[type[BlockRunner]] = MLPRunner
    #: The config field holding the MLP's intermediate width.
    mlp_width: ClassVar[str] = "intermediate_size"
    #: The layer's norms feeding the attention block and the MLP block.
    pre_norms: ClassVar[tuple[str, str]] = ("input_layernorm", "post_attention_layernorm")
    #: The layer's norms applied to the attention and MLP outputs before the residual (None: none).
    post_norms: ClassVar[tuple[str, str] | None] = None

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def geometry(self, kind: BlockKind) -> BlockGeometry:
        cfg = self.config
        if kind is BlockKind.ATTENTION:
            heads = int(cfg.num_attention_heads)
            kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
            return BlockGeometry(kind, units=heads, unit_width=head_dim, num_kv_heads=kv)
        return BlockGeometry(kind, units=int(getattr(cfg, self.mlp_width)), unit_width=1)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        """The module the MLP runner is built on (the layer's ``mlp``)."""
        return layer.mlp

    def runner(self, layer_index: int, kind: BlockKind) -> BlockRunner:
        layer = self.layers[layer_index]
        if kind is BlockKind.ATTENTION:
            return self.attention_runner(layer.self_attn, self.geometry(kind), layer_index, self.config)
        return self.mlp_runner(self.mlp_module(layer), self.geometry(kind))

    def norm(self, layer: nn.Module, kind: BlockKind) -> nn.Module:
        """The layer's norm of the block of ``kind`` (named by :attr:`pre_norms`)."""
        return getattr(layer, self.pre_norms[kind is BlockKind.MLP])

    def block_input(self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor) -> torch.Tensor:
        norm = self.norm(layer, kind)
        return norm(hidden)

    def block_residual(
        self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor, block_out: torch.Tensor
    ) -> torch.Tensor:
        if self.post_norms is None:
            return hidden + block_out
        return hidden + getattr(layer, self.post_norms[kind is BlockKind.MLP])(block_out)
